"""Two registered versions side by side: metrics, per-class deltas, config differences, data fingerprints."""

from __future__ import annotations

HEADLINE = ("test_accuracy", "test_loss", "promotion_floor", "epochs_run", "train_seconds")


def compare_manifests(first: dict, second: dict) -> dict:
    """What differs between two version manifests (JSON-friendly).

    Returns:
        `versions` (name and number of each), `metrics` (each headline metric for both and the
        change), `calibration` (test ECE after calibration, where recorded), `per_class` (F1 of each
        class for both and the change), `config` (only the fields whose values differ), `data`
        (dataset and test-set fingerprints and counts) and `same_test_set`.
    """

    def label(manifest: dict) -> str:
        return f"{manifest.get('name', '?')} v{manifest.get('version', '?')}"

    def change(a, b):
        return round(b - a, 6) if isinstance(a, int | float) and isinstance(b, int | float) else None

    metrics = {
        key: {"first": first["metrics"].get(key), "second": second["metrics"].get(key),
              "change": change(first["metrics"].get(key), second["metrics"].get(key))}
        for key in HEADLINE
    }  # fmt: skip
    ece = [(m.get("calibration") or {}).get("test_ece_after") for m in (first, second)]
    f1 = [{row["class"]: row["f1"] for row in m["metrics"].get("per_class", [])} for m in (first, second)]
    classes = list(f1[0]) + [name for name in f1[1] if name not in f1[0]]
    config_keys = sorted(set(first.get("config", {})) | set(second.get("config", {})))
    data = [m.get("dataset", {}) for m in (first, second)]
    return {
        "versions": [label(first), label(second)],
        "metrics": metrics,
        "calibration": {"test_ece_after": {"first": ece[0], "second": ece[1], "change": change(*ece)}},
        "per_class": {
            name: {
                "first": f1[0].get(name),
                "second": f1[1].get(name),
                "change": change(f1[0].get(name), f1[1].get(name)),
            }
            for name in classes
        },
        "config": {
            key: {"first": first["config"].get(key), "second": second["config"].get(key)}
            for key in config_keys
            if first.get("config", {}).get(key) != second.get("config", {}).get(key)
        },
        "data": {
            key: {"first": data[0].get(key), "second": data[1].get(key)}
            for key in ("fingerprint", "test_fingerprint", "train_count", "test_count", "source")
        },
        "same_test_set": data[0].get("test_fingerprint") == data[1].get("test_fingerprint"),
    }


def comparison_text(comparison: dict) -> list[str]:
    """The comparison as aligned text lines for a terminal."""
    first, second = comparison["versions"]
    width = max(len(first), len(second), 10)

    def row(name: str, cell: dict) -> str:
        shown = [
            ("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
            for v in (cell["first"], cell["second"])
        ]
        delta = cell.get("change")
        delta = "" if delta is None else f"{delta:+d}" if isinstance(delta, int) else f"{delta:+.4f}"
        return f"{name:<26} {shown[0]:>{width}} {shown[1]:>{width}} {delta:>9}"

    lines = [f"{'':<26} {first:>{width}} {second:>{width}} {'change':>9}"]
    lines += [row(name, cell) for name, cell in comparison["metrics"].items()]
    lines.append(row("test ECE (calibrated)", comparison["calibration"]["test_ece_after"]))
    lines += ["", "per-class F1:"] + [row(f"  {name}", cell) for name, cell in comparison["per_class"].items()]
    lines += ["", "config differences:"]
    lines += [row(f"  {name}", {**cell, "change": None}) for name, cell in comparison["config"].items()] or ["  none"]
    lines += ["", "data:"] + [row(f"  {name}", {**cell, "change": None}) for name, cell in comparison["data"].items()]
    if not comparison["same_test_set"]:
        lines.append("note: different test sets: the accuracies were measured on different images")
    return lines
