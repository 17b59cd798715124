"""TFLite exports of a registered version: interpreter parity, manifest entries, batch prediction."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import model_lib.export
from flows.batch_predict import batch_predict
from flows.train_cifar import train_cifar
from model_lib.data import load_arrays
from model_lib.export import export_version
from model_lib.fileio import read_json, sha256_file
from model_lib.inference import TFLiteClassifier
from model_lib.registry import load_verified_model, verify_version


@pytest.fixture
def exported(prefect_harness, colour_dataset, artifacts):
    result = train_cifar(profile="seed", data=str(colour_dataset), epochs=4, batch_size=8, validation_split=0.25,
                         export=True)  # fmt: skip
    return Path(result["path"]), result


def test_exports_match_keras_and_are_recorded(exported, artifacts):
    version_dir, result = exported
    manifest = read_json(version_dir / "manifest.json")
    entries = {entry["format"]: entry for entry in manifest["exports"]}
    assert set(entries) == {"float32", "float16", "int8"} and result["exports"][0]["format"] == "float32"
    keras_model = load_verified_model(version_dir)
    x_test = np.asarray(load_arrays(artifacts / "datasets" / manifest["dataset"]["fingerprint"]).x_test)
    keras_top1 = keras_model.predict(x_test, verbose=0).argmax(axis=1)
    for export_format, entry in entries.items():
        path = version_dir / entry["file"]
        assert entry["size_bytes"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
        assert manifest["files"][entry["file"]] == entry["sha256"]
        assert 0 <= entry["test_accuracy"] <= 1 and entry["status"] in ("ok", "failed")
        probabilities = TFLiteClassifier(path).predict(x_test)
        agreement = (probabilities.argmax(axis=1) == keras_top1).mean()
        assert agreement >= (0.99 if export_format != "int8" else 0.9), (export_format, agreement)
    assert entries["int8"]["size_bytes"] < entries["float32"]["size_bytes"] / 2
    assert verify_version(version_dir) == []


def test_int8_too_far_below_float32_is_marked_failed(exported, artifacts, monkeypatch):
    version_dir, _ = exported
    monkeypatch.setattr(model_lib.export, "INT8_MAX_DROP", -1.0)  # any int8 result is now "too far below"
    entries = export_version(version_dir, artifacts, ("float32", "int8"), log=lambda m: None)
    int8 = next(entry for entry in entries if entry["format"] == "int8")
    assert int8["status"] == "failed" and "below float32" in int8["reason"]
    assert read_json(version_dir / "manifest.json")["exports"][1]["status"] == "failed"


def test_unquantized_int8_is_marked_failed(exported, artifacts, monkeypatch):
    version_dir, _ = exported
    real_convert = model_lib.export.convert
    monkeypatch.setattr(
        model_lib.export, "convert", lambda model, fmt, calibration: real_convert(model, "float32", calibration)
    )
    entries = export_version(version_dir, artifacts, ("int8",), log=lambda m: None)
    assert entries[0]["status"] == "failed" and "unquantized" in entries[0]["reason"]


def test_batch_predict_runs_a_tflite_export(exported, colour_dataset, tmp_path):
    version_dir, _ = exported
    keras_csv = pd.read_csv(batch_predict(str(colour_dataset / "test"), output_csv=str(tmp_path / "k.csv"),
                                          model=str(version_dir))["output_csv"])  # fmt: skip
    summary = batch_predict(str(colour_dataset / "test"), output_csv=str(tmp_path / "t.csv"),
                            model=str(version_dir / "model_int8.tflite"))  # fmt: skip
    assert summary["model"].endswith("(model_int8.tflite)")
    tflite_csv = pd.read_csv(summary["output_csv"])
    assert (tflite_csv["status"] == "ok").all() and (tflite_csv["label"] == keras_csv["label"]).mean() >= 0.9
