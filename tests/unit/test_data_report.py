"""The data report and its gates on small file tables: counts, changes, duplicates, leakage, classes."""

import pandas as pd
import pytest

from model_lib.config import ConfigError, TrainConfig
from model_lib.data_report import (
    DataGateError,
    PreviousData,
    build_report,
    check_gates,
    data_report_markdown,
    load_previous,
    write_report,
)
from model_lib.fileio import write_json


def table(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """File-table rows from (split, path, class, pixel hash)."""
    return pd.DataFrame(
        [{"split": s, "path": p, "class": c, "width": 32, "height": 32, "kind": "PNG RGB", "pixels": h}
         for s, p, c, h in rows]
    )  # fmt: skip


def grown(per_class: int, classes=("cat", "dog"), test_per_class: int = 2, prefix: str = "") -> list[tuple]:
    rows = [("train", f"train/{c}/{i}.png", c, f"{prefix}{c}{i}") for c in classes for i in range(per_class)]
    return rows + [("test", f"test/{c}/{i}.png", c, f"{prefix}{c}t{i}") for c in classes for i in range(test_per_class)]


def test_counts_changes_and_file_diff_against_the_previous_version():
    before = table(grown(10))
    now_rows = [r for r in grown(12) if r[1] != "train/dog/0.png"]  # 2 cats and 2 dogs added, one dog removed
    now_rows = [(s, p, c, "edited" if p == "train/cat/1.png" else h) for s, p, c, h in now_rows]
    previous = PreviousData(3, {"cat": {"train": 10, "test": 2}, "dog": {"train": 10, "test": 2}}, before)
    report = build_report(table(now_rows), ["cat", "dog"], [], previous, TrainConfig())
    assert report["class_counts"] == {"cat": {"train": 12, "test": 2}, "dog": {"train": 11, "test": 2}}
    changes = report["previous"]
    assert changes["class_changes"] == {"cat": {"train": 2, "test": 0}, "dog": {"train": 1, "test": 0}}
    assert (changes["files_added"], changes["files_removed"], changes["files_changed"]) == (4, 1, 1)
    assert changes["files_removed_examples"] == ["train/dog/0.png"]
    assert changes["files_changed_examples"] == ["train/cat/1.png"]
    assert report["gates"]["passed"] and report["gates"]["warnings"] == []
    markdown = data_report_markdown(report)
    assert "| cat | 12 (+2) | 2 (+0) |" in markdown and "4 added, 1 removed, 1 changed" in markdown


def test_leakage_fails_the_gate_with_the_files_named_and_passes_when_relaxed():
    rows = grown(10)
    rows += [("train", "train/cat/copy.png", "cat", "catt1")]  # the pixels of test/cat/1.png
    report = build_report(table(rows), ["cat", "dog"], [], None, TrainConfig())
    assert report["duplicates"]["train_test"] == 1 and report["duplicates"]["train_test_fraction"] == 0.25
    with pytest.raises(DataGateError, match=r"test leakage: 1 test image.*test/cat/1\.png = train/cat/copy\.png"):
        check_gates(report)
    check_gates(build_report(table(rows), ["cat", "dog"], [], None, TrainConfig(max_leakage=0.25)))


def test_duplicates_inside_train_warn_and_small_classes_fail():
    rows = grown(3, classes=("cat",)) + grown(12, classes=("dog",))
    rows += [("train", "train/dog/again.png", "dog", "dog0")]
    report = build_report(table(rows), ["cat", "dog"], ["train/dog/bad.png: not an image"], None, TrainConfig())
    assert report["duplicates"]["within_train"] == 1
    assert report["duplicates"]["within_train_examples"] == [["train/dog/0.png", "train/dog/again.png"]]
    assert any("1 training image(s) are exact copies" in w for w in report["gates"]["warnings"])
    assert any("1 undecodable file(s) skipped" in w for w in report["gates"]["warnings"])
    with pytest.raises(DataGateError, match=r"below --min-class-images 10: cat \(3\)"):
        check_gates(report)
    check_gates(build_report(table(rows), ["cat", "dog"], [], None, TrainConfig(min_class_images=3)))


def test_vanished_class_fails_unless_allowed_and_added_class_and_balance_shift_warn():
    counts = {"cat": {"train": 10, "test": 2}, "dog": {"train": 10, "test": 2}, "eel": {"train": 10, "test": 2}}
    previous = PreviousData(1, counts, None, "v1 has no data_files.csv.gz")
    rows = grown(30, classes=("cat",)) + grown(10, classes=("dog", "fox"))
    report = build_report(table(rows), ["cat", "dog", "fox"], [], previous, TrainConfig())
    assert report["previous"]["vanished_classes"] == ["eel"] and report["previous"]["added_classes"] == ["fox"]
    # shares now cat .6 dog .2 fox .2, before a third each: half the summed differences
    assert report["previous"]["balance_shift"] == pytest.approx(
        0.5 * (0.6 - 1 / 3 + 1 / 3 - 0.2 + 0.2 + 1 / 3), abs=1e-4
    )
    warnings = " ".join(report["gates"]["warnings"])
    assert "new class(es) since v1: fox" in warnings and "class balance shifted" in warnings
    with pytest.raises(DataGateError, match=r"class\(es\) of v1 vanished: eel \(pass --allow-class-change"):
        check_gates(report)
    relaxed = build_report(table(rows), ["cat", "dog", "fox"], [], previous, TrainConfig(allow_class_change=True))
    check_gates(relaxed)
    assert "not compared (v1 has no data_files.csv.gz)" in data_report_markdown(relaxed)
    assert "| eel | 0 (-10) | 0 (-2) |" in data_report_markdown(relaxed)


def test_previous_version_files_are_used_only_when_their_checksums_match(tmp_path):
    files = table(grown(10))
    report = build_report(files, ["cat", "dog"], [], None, TrainConfig())
    version_dir = tmp_path / "v1"
    written = write_report(report, files, version_dir)
    from model_lib.fileio import sha256_file

    write_json(version_dir / "manifest.json", {"files": {name: sha256_file(path) for name, path in written.items()}})
    previous = load_previous(1, version_dir)
    assert previous.note == "" and previous.class_counts == report["class_counts"]
    pd.testing.assert_frame_equal(previous.files, files)
    (version_dir / "data_files.csv.gz").write_bytes(b"tampered")
    tampered = load_previous(1, version_dir)
    assert tampered.files is None and "data_files.csv.gz is missing or fails its checksum" in tampered.note


@pytest.mark.parametrize(
    ("field", "value"), [("max_leakage", 1.5), ("balance_shift_warning", -0.1), ("min_class_images", 0)]
)
def test_gate_thresholds_are_checked(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        TrainConfig(**{field: value})
