"""The data report and the gates on it: what a run's data holds, what changed since the previous
registered version's data, and whether it is fit to train on (checked before training).

Duplicates are exact: equal decoded pixels (`data.pixel_hash`). A test image whose pixels also
appear in train is test leakage: the model is scored on an image it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model_lib.config import TrainConfig, option
from model_lib.data import read_file_table
from model_lib.fileio import atomic_open, read_json, sha256_file, write_json
from model_lib.versions import MANIFEST_FILE

DATA_REPORT_FILE = "data_report.json"
DATA_REPORT_MARKDOWN = "data_report.md"
FILES_FILE = "data_files.csv.gz"  # the data's file table, kept with each version to diff the next one against
EXAMPLES = 10  # file names listed per finding; the counts are always complete


class DataGateError(RuntimeError):
    """The data failed a gate; the message names the gate, the figures, the files and the option to relax it."""


@dataclass(frozen=True)
class PreviousData:
    """The data of the previous registered version, to compare against."""

    version: int
    class_counts: dict | None  # class -> {"train": n, "test": n}; None when that version has no report
    files: pd.DataFrame | None  # its file table; None when it has none (or it failed its checksum)
    note: str = ""  # why something is missing


def load_previous(version: int, version_dir: Path) -> PreviousData:
    """The previous version's data report and file table, each used only if its sha256 matches the manifest."""
    manifest = read_json(version_dir / MANIFEST_FILE)
    checksums, notes = manifest.get("files", {}), []

    def intact(name: str) -> bool:
        path = version_dir / name
        if name not in checksums:
            notes.append(f"v{version} has no {name}")
            return False
        if not path.is_file() or sha256_file(path) != checksums[name]:
            notes.append(f"v{version}'s {name} is missing or fails its checksum")
            return False
        return True

    counts = read_json(version_dir / DATA_REPORT_FILE)["class_counts"] if intact(DATA_REPORT_FILE) else None
    files = read_file_table(version_dir / FILES_FILE) if intact(FILES_FILE) else None
    return PreviousData(version, counts, files, "; ".join(notes))


def write_file_table(files: pd.DataFrame, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        files.to_csv(handle, index=False, compression="gzip", encoding="utf-8", errors="surrogateescape")


def build_report(
    files: pd.DataFrame, class_names: list[str], skipped: list[str], previous: PreviousData | None, config: TrainConfig
) -> dict:
    """The data report of a file table (see `data.load_file_table`), with the gates' verdict.

    Args:
        files: One row per image: split, path, class, width, height, kind, pixels (hash).
        class_names: The dataset's classes, in label order.
        skipped: Files ingest skipped as undecodable.
        previous: The previous registered version's data, or None for a model's first version.
        config: The run's config; its data-gate fields set the thresholds.

    Returns:
        A JSON-friendly dict; `gates.failures` is empty when the data may be trained on.
    """
    counts = {
        name: {split: int(((files["class"] == name) & (files["split"] == split)).sum()) for split in ("train", "test")}
        for name in class_names
    }
    train, test = files[files["split"] == "train"], files[files["split"] == "test"]
    report = {
        "classes": class_names,
        "class_counts": counts,
        "duplicates": _duplicates(train, test),
        "skipped_files": skipped,
        "images": _image_summary(files),
        "previous": None,
    }
    if previous is not None:
        report["previous"] = _changes(files, counts, previous)
    report["gates"] = _gates(report, config)
    return report


def _duplicates(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    repeated = train[train.duplicated("pixels", keep=False)].groupby("pixels", sort=False)["path"].apply(list)
    first_copy = train.drop_duplicates("pixels").set_index("pixels")["path"]
    leaked = test[test["pixels"].isin(first_copy.index)]
    return {
        "within_train": int(sum(len(paths) - 1 for paths in repeated)),
        "within_train_examples": [paths for paths in repeated.head(EXAMPLES)],
        "train_test": len(leaked),
        "train_test_fraction": round(len(leaked) / len(test), 6) if len(test) else 0.0,
        "train_test_examples": [
            {"test": row.path, "train": first_copy[row.pixels]} for row in leaked.head(EXAMPLES).itertuples()
        ],
    }


def _image_summary(files: pd.DataFrame) -> dict:
    sizes = (files["width"].astype(str) + "x" + files["height"].astype(str)).value_counts()
    return {
        "count": len(files),
        "sizes": {size: int(n) for size, n in sizes.head(5).items()},
        "distinct_sizes": len(sizes),
        "smallest": [int(files["width"].min()), int(files["height"].min())] if len(files) else None,
        "largest": [int(files["width"].max()), int(files["height"].max())] if len(files) else None,
        "kinds": {kind: int(n) for kind, n in files["kind"].value_counts().items()},
    }


def _changes(files: pd.DataFrame, counts: dict, previous: PreviousData) -> dict:
    changes: dict = {"version": previous.version, "note": previous.note}
    if previous.class_counts is not None:
        names = list(counts) + [name for name in previous.class_counts if name not in counts]
        changes["class_changes"] = {
            name: {
                split: counts.get(name, {}).get(split, 0) - previous.class_counts.get(name, {}).get(split, 0)
                for split in ("train", "test")
            }
            for name in names
        }
        changes["added_classes"] = [name for name in counts if name not in previous.class_counts]
        changes["vanished_classes"] = [name for name in previous.class_counts if name not in counts]
        changes["balance_shift"] = round(_balance_shift(counts, previous.class_counts), 4)
    if previous.files is not None:
        joined = files.merge(
            previous.files, on=["split", "path"], how="outer", suffixes=("", "_before"), indicator=True
        )
        added, removed = joined[joined["_merge"] == "left_only"], joined[joined["_merge"] == "right_only"]
        both = joined[joined["_merge"] == "both"]
        changed = both[both["pixels"] != both["pixels_before"]]
        for label, rows in (("added", added), ("removed", removed), ("changed", changed)):
            changes[f"files_{label}"] = len(rows)
            changes[f"files_{label}_examples"] = rows["path"].head(EXAMPLES).tolist()
    return changes


def _balance_shift(now: dict, before: dict) -> float:
    """Total variation distance between the training class shares now and before (0 = same, 1 = disjoint)."""
    total_now = sum(c["train"] for c in now.values()) or 1
    total_before = sum(c.get("train", 0) for c in before.values()) or 1
    names = set(now) | set(before)
    return 0.5 * sum(
        abs(now.get(n, {}).get("train", 0) / total_now - before.get(n, {}).get("train", 0) / total_before)
        for n in names
    )


def _gates(report: dict, config: TrainConfig) -> dict:
    failures, warnings = [], []
    duplicates = report["duplicates"]
    if duplicates["train_test_fraction"] > config.max_leakage:
        pairs = "; ".join(f"{p['test']} = {p['train']}" for p in duplicates["train_test_examples"])
        failures.append(
            f"test leakage: {duplicates['train_test']} test image(s) ({duplicates['train_test_fraction']:.2%}) are "
            f"exact copies of training images, above {option('max_leakage')} {config.max_leakage}: {pairs}"
        )
    small = {name: c["train"] for name, c in report["class_counts"].items() if c["train"] < config.min_class_images}
    if small:
        listing = ", ".join(f"{name} ({n})" for name, n in small.items())
        failures.append(
            f"too few training images, below {option('min_class_images')} {config.min_class_images}: {listing}"
        )
    previous = report["previous"] or {}
    if previous.get("vanished_classes") and not config.allow_class_change:
        failures.append(
            f"class(es) of v{previous['version']} vanished: {', '.join(previous['vanished_classes'])} "
            f"(pass {option('allow_class_change')} if intended)"
        )
    if previous.get("added_classes"):
        warnings.append(f"new class(es) since v{previous['version']}: {', '.join(previous['added_classes'])}")
    if previous.get("balance_shift", 0) > config.balance_shift_warning:
        warnings.append(
            f"class balance shifted by {previous['balance_shift']:.3f} (total variation) since v{previous['version']}, "
            f"above {option('balance_shift_warning')} {config.balance_shift_warning}"
        )
    if duplicates["within_train"]:
        warnings.append(f"{duplicates['within_train']} training image(s) are exact copies of other training images")
    if report["skipped_files"]:
        warnings.append(f"{len(report['skipped_files'])} undecodable file(s) skipped")
    thresholds = {
        "max_leakage": config.max_leakage,
        "min_class_images": config.min_class_images,
        "allow_class_change": config.allow_class_change,
        "balance_shift_warning": config.balance_shift_warning,
    }
    return {"passed": not failures, "failures": failures, "warnings": warnings, "thresholds": thresholds}


def check_gates(report: dict) -> None:
    """Raise when the report's data failed a gate.

    Raises:
        DataGateError: Every failed gate, in one message.
    """
    if report["gates"]["failures"]:
        raise DataGateError("data gate failed before training: " + " | ".join(report["gates"]["failures"]))


def write_report(report: dict, files: pd.DataFrame, out_dir: Path) -> dict[str, str]:
    """Write the report (JSON and Markdown) and the file table into `out_dir`; return the paths by name."""
    paths = {
        DATA_REPORT_FILE: out_dir / DATA_REPORT_FILE,
        DATA_REPORT_MARKDOWN: out_dir / DATA_REPORT_MARKDOWN,
        FILES_FILE: out_dir / FILES_FILE,
    }
    write_json(paths[DATA_REPORT_FILE], report)
    with atomic_open(paths[DATA_REPORT_MARKDOWN], "w", encoding="utf-8", errors="backslashreplace") as handle:
        handle.write(data_report_markdown(report))
    write_file_table(files, paths[FILES_FILE])
    return {name: str(path) for name, path in paths.items()}


def data_report_markdown(report: dict) -> str:
    """The data report as Markdown: gates, per-class counts with changes, duplicates, files, images."""
    gates, previous, duplicates, images = report["gates"], report["previous"], report["duplicates"], report["images"]
    changes = (previous or {}).get("class_changes", {})
    verdict = "passed" if gates["passed"] else "**failed**"
    lines = [f"# Data report: gates {verdict}", ""]
    findings = [f"- failed: {text}" for text in gates["failures"]] + [
        f"- warning: {text}" for text in gates["warnings"]
    ]
    lines += findings + [""] * bool(findings)
    since = f" (change since v{previous['version']})" if changes else ""
    lines += [f"| class | train{since} | test{since} |", "|---|---|---|"]
    for name in list(report["class_counts"]) + [n for n in changes if n not in report["class_counts"]]:
        count = report["class_counts"].get(name, {"train": 0, "test": 0})
        delta = changes.get(name)
        cells = [f"{count[s]}" + (f" ({delta[s]:+d})" if delta else "") for s in ("train", "test")]
        lines.append(f"| {_cell(name)} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"- duplicates (equal pixels): {duplicates['within_train']} inside train, {duplicates['train_test']} test "
        f"image(s) also in train ({duplicates['train_test_fraction']:.2%})",
    ]
    if previous and "files_added" in previous:
        lines.append(
            f"- files since v{previous['version']}: {previous['files_added']} added, {previous['files_removed']} "
            f"removed, {previous['files_changed']} changed"
        )
    elif previous:
        lines.append(f"- files since v{previous['version']}: not compared ({previous['note'] or 'no file table'})")
    sizes = ", ".join(f"{size} ({n})" for size, n in images["sizes"].items())
    kinds = ", ".join(f"{kind} ({n})" for kind, n in images["kinds"].items())
    lines += [
        f"- images: {images['count']}; sizes {sizes} ({images['distinct_sizes']} distinct); kinds {kinds}",
        f"- skipped as undecodable: {len(report['skipped_files'])}",
    ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")
