"""Two registered versions side by side: metrics, per-class deltas, config differences, data fingerprints."""

from __future__ import annotations

HEADLINE = ("test_accuracy", "test_loss", "promotion_floor", "epochs_run", "train_seconds")


def compare_manifests(first: dict, second: dict, pruning: dict | None = None) -> dict:
    """What differs between two version manifests (JSON-friendly).

    Args:
        pruning: Where one version was pruned from the other, its `pruning.json`: the two timed side by side.

    Returns:
        `versions` (name and number of each), `metrics` (each headline metric for both and the
        change), `calibration` (test ECE after calibration, where recorded), `size` (parameters, and the
        Keras images/s of a pruned version and its parent timed together), `per_class` (F1 of each
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
        "size": _size(first, second, pruning, change),
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


def _size(first: dict, second: dict, pruning: dict | None, change) -> dict:
    """Parameters of both, and where one is pruned from the other, both Keras images/s as timed together, the change
    a ratio (the pruned version's `pruning.json`; images/s of separate runs or hosts are not compared)."""
    parameters = [m.get("parameter_count") for m in (first, second)]
    size = {"parameters": {"first": parameters[0], "second": parameters[1], "change": change(*parameters)}}
    if pruning:
        speeds = (round(pruning["parent_images_per_second"]), round(pruning["images_per_second"]))
        if (second.get("config") or {}).get("pruned") is None:  # the first is the pruned one
            speeds = speeds[::-1]
        size["Keras images/s (together)"] = {"first": speeds[0], "second": speeds[1],
                                              "change": f"{speeds[1] / speeds[0]:.2f}x"}  # fmt: skip
    return size


def pruned_summary(pruned: dict) -> str:
    """A `config.pruned` record in one line: where from, how, and what it kept."""
    return (f"from {pruned['from']}, {pruned['criterion']}, keep {pruned['keep']:g}: channels "
            f"{'/'.join(map(str, pruned['channels']))} of {'/'.join(map(str, pruned['channels_before']))}, "
            f"{pruned['flops'] / 1e6:.1f} of {pruned['flops_before'] / 1e6:.1f} MFLOPs")  # fmt: skip


def comparison_text(comparison: dict) -> list[str]:
    """The comparison as aligned text lines for a terminal."""
    first, second = comparison["versions"]
    width = max(len(first), len(second), 10)

    def shown(value) -> str:
        if isinstance(value, dict) and {"from", "keep", "channels"} <= set(value):
            return pruned_summary(value)
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    def row(name: str, cell: dict) -> str:
        shown_values = [shown(cell["first"]), shown(cell["second"])]
        delta = cell.get("change")
        delta = (delta if isinstance(delta, str) else "" if delta is None else f"{delta:+d}" if isinstance(delta, int)
                 else f"{delta:+.4f}")  # fmt: skip
        return f"{name:<26} {shown_values[0]:>{width}} {shown_values[1]:>{width}} {delta:>9}"

    lines = [f"{'':<26} {first:>{width}} {second:>{width}} {'change':>9}"]
    lines += [row(name, cell) for name, cell in comparison["metrics"].items()]
    lines.append(row("test ECE (calibrated)", comparison["calibration"]["test_ece_after"]))
    lines += [row(name, cell) for name, cell in comparison["size"].items()]
    lines += ["", "per-class F1:"] + [row(f"  {name}", cell) for name, cell in comparison["per_class"].items()]
    lines += ["", "config differences:"]
    lines += [row(f"  {name}", {**cell, "change": None}) for name, cell in comparison["config"].items()] or ["  none"]
    lines += ["", "data:"] + [row(f"  {name}", {**cell, "change": None}) for name, cell in comparison["data"].items()]
    if not comparison["same_test_set"]:
        lines.append("note: different test sets: the accuracies were measured on different images")
    return lines
