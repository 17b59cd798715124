"""Exports of a registered version (TFLite, ONNX): parity with Keras, manifest entries, batch prediction."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import model_lib.export
from flows.batch_predict import batch_predict
from model_lib.data import load_arrays
from model_lib.export import export_version, feature_rule_file
from model_lib.fileio import read_json, sha256_file, write_json
from model_lib.inference import KerasClassifier, OnnxClassifier, TFLiteClassifier, cascade, sharpened
from model_lib.models import unwrap_tta, with_features
from model_lib.ood import FeatureRule, classified
from model_lib.precision import machine_key
from model_lib.predict import CASCADE_NOTE, load_classifier, resolve_model
from model_lib.serving import TFLITE_FORMATS, cascade_rule, serving_export, serving_exports
from model_lib.split import load_split, run_split
from model_lib.versions import ChecksumError, RegistryError, load_verified_model, verify_version
from tests.synthetic import UNLIKE_KINDS, write_unlike_images


@pytest.fixture
def exported(trained_and_exported, artifacts) -> tuple[Path, dict]:
    """The module's trained version, copied into this test's ARTIFACTS_DIR: tests tamper with it."""
    source, result = trained_and_exported
    shutil.copytree(source, artifacts, dirs_exist_ok=True)
    version_dir = artifacts / Path(result["path"]).relative_to(source)
    return version_dir, {**result, "path": str(version_dir)}


def test_exports_match_keras_and_are_recorded(exported, artifacts):
    version_dir, result = exported
    manifest = read_json(version_dir / "manifest.json")
    entries = {entry["format"]: entry for entry in manifest["exports"]}
    assert set(entries) == {"float32", "float16", "int8"} and result["exports"][0]["format"] == "float32"
    keras_model = load_verified_model(version_dir)
    arrays = load_arrays(artifacts / "datasets" / manifest["dataset"]["fingerprint"])
    x_test, y_test = np.asarray(arrays.x_test), np.asarray(arrays.y_test)
    keras_probabilities = keras_model.predict(x_test, verbose=0)
    keras_top1 = keras_probabilities.argmax(axis=1)
    for export_format, entry in entries.items():
        path = version_dir / entry["file"]
        assert entry["size_bytes"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
        assert manifest["files"][entry["file"]] == entry["sha256"]
        assert entry["status"] in ("ok", "failed")
        assert entry["images_per_second"] > 0 and entry["host"] == machine_key()  # timed here, for `auto`'s order
        probabilities = TFLiteClassifier(path).predict(x_test)
        assert entry["test_accuracy"] == pytest.approx((probabilities.argmax(axis=1) == y_test).mean(), abs=1e-6)
        agreement = (probabilities.argmax(axis=1) == keras_top1).mean()
        assert entry["agreement"] == pytest.approx(agreement), export_format  # what serving relies on
        # A 4-epoch model's classes are often within a few hundredths of each other, where int8's
        # 1/256 output steps may reorder them: compare probabilities, and labels where Keras is decisive.
        error = np.abs(probabilities - keras_probabilities).max()
        assert error <= (1e-3 if export_format != "int8" else 0.05), (export_format, error)
        top2 = np.sort(keras_probabilities, axis=1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * error
        assert (probabilities.argmax(axis=1) == keras_top1)[decisive].all(), export_format
    assert entries["int8"]["size_bytes"] < entries["float32"]["size_bytes"] / 2
    assert verify_version(version_dir) == []


@pytest.mark.slow
def test_int8_too_far_below_float32_is_marked_failed(exported, artifacts, monkeypatch):
    version_dir, _ = exported
    monkeypatch.setattr(model_lib.export, "INT8_MAX_DROP", -1.0)  # any int8 result is now "too far below"
    entries = export_version(version_dir, artifacts, ("float32", "int8"), log=lambda m: None, force=True)
    int8 = next(entry for entry in entries if entry["format"] == "int8")
    assert int8["status"] == "failed" and "below float32" in int8["reason"] and int8["parity"] is False
    manifest = read_json(version_dir / "manifest.json")
    recorded = {entry["format"]: entry for entry in manifest["exports"]}
    assert recorded["int8"]["status"] == "failed" and list(recorded) == list(TFLITE_FORMATS)  # float16 stays listed
    assert serving_export(manifest) != "model_int8.tflite"  # a failed export never serves


def test_unquantized_int8_is_marked_failed(exported, artifacts, monkeypatch):
    version_dir, _ = exported
    real_convert = model_lib.export.convert
    monkeypatch.setattr(
        model_lib.export,
        "convert",
        lambda saved_model, fmt, calibration: real_convert(saved_model, "float32", calibration),
    )
    entries = export_version(version_dir, artifacts, ("int8",), log=lambda m: None, force=True)
    assert entries[0]["status"] == "failed" and "unquantized" in entries[0]["reason"]
    manifest = read_json(version_dir / "manifest.json")
    assert [entry["format"] for entry in manifest["exports"]] == list(TFLITE_FORMATS)  # the others stay listed
    assert all(entry["sha256"] == manifest["files"][entry["file"]] for entry in manifest["exports"])


def test_serving_export_is_the_fastest_that_passed_parity():
    def manifest(*passed):
        exports = [{"format": f, "file": f"model_{f}.tflite", "parity": f in passed} for f in TFLITE_FORMATS]
        return {"exports": exports, "files": {e["file"]: "sha" for e in exports}}

    assert serving_export(manifest("float32", "float16", "int8")) == "model_int8.tflite"
    assert serving_export(manifest("float32", "float16")) == "model_float16.tflite"
    assert serving_export(manifest()) is None and serving_export({"files": {}}) is None
    unlisted = manifest("int8")
    del unlisted["files"]["model_int8.tflite"]
    assert serving_export(unlisted) is None  # a file the manifest does not vouch for never serves

    def timed(speeds: dict, host: str = "this CPU") -> dict:  # each format's images/s, as `export` measured them
        timings = manifest(*speeds)
        for entry in timings["exports"]:
            entry |= {"images_per_second": speeds.get(entry["format"]), "host": host}
        return timings

    # Timed on this host, a format over 1.25x the fixed order's first serves first; within it, the order stands.
    assert serving_export(timed({"float32": 3000, "float16": 900, "int8": 2000}), host="this CPU") == (
        "model_float32.tflite")  # fmt: skip
    assert serving_export(timed({"float32": 2400, "float16": 900, "int8": 2000}), host="this CPU") == (
        "model_int8.tflite")  # fmt: skip
    # Timed on another host, or not every candidate timed: the fixed order.
    assert serving_export(timed({"float32": 3000, "float16": 900, "int8": 2000}, "another CPU"), host="this CPU") == (
        "model_int8.tflite")  # fmt: skip
    untimed = timed({"float32": 3000, "float16": None, "int8": 2000})  # float16 passed, exported before timings
    assert serving_export(untimed, host="this CPU") == "model_int8.tflite"


@pytest.mark.slow
def test_batch_predict_runs_a_tflite_export(exported, colour_dataset, artifacts, tmp_path):
    version_dir, _ = exported
    auto = batch_predict(str(colour_dataset / "test"), output_csv=str(tmp_path / "a.csv"), model=str(version_dir))
    chosen = serving_export(read_json(version_dir / "manifest.json"))
    assert chosen is not None and auto["model"].endswith(f"({chosen})")  # float16 always matches this model
    assert pd.read_csv(auto["output_csv"])["model"].str.endswith(chosen).all()
    keras = batch_predict(str(colour_dataset / "test"), output_csv=str(tmp_path / "k.csv"), model=str(version_dir),
                          engine="keras")  # fmt: skip
    assert keras["model"].endswith("v1")
    keras_csv = pd.read_csv(keras["output_csv"])
    summary = batch_predict(str(colour_dataset / "test"), output_csv=str(tmp_path / "t.csv"),
                            model=str(version_dir / "model_int8.tflite"))  # fmt: skip
    assert summary["model"].endswith("(model_int8.tflite)")
    tflite_csv = pd.read_csv(summary["output_csv"])
    assert (tflite_csv["status"] == "ok").all()
    decisive = keras_csv["top1_probability"] - keras_csv["top2_probability"] > 0.1  # int8 errs by <= 0.05 (above)
    assert (tflite_csv["label"] == keras_csv["label"])[decisive].all()

    # A tampered export is passed over, with a warning, for the next one (or the Keras model).
    chosen_path = version_dir / chosen
    chosen_path.write_bytes(chosen_path.read_bytes() + b"tampered")
    fallback = batch_predict(str(colour_dataset / "test"), output_csv=str(tmp_path / "f.csv"), model=str(version_dir))
    assert not fallback["model"].endswith(f"({chosen})") and fallback["ok"] == len(keras_csv)
    # export keeps the intact formats and converts only the tampered one again
    exports = read_json(version_dir / "manifest.json")["exports"]
    logged = []
    export_version(version_dir, artifacts, tuple(entry["format"] for entry in exports), log=logged.append)
    converted = [line.split(":")[0] for line in logged if " images/s here, test accuracy " in line]
    assert converted == [entry["format"] for entry in exports if entry["file"] == chosen]
    assert verify_version(version_dir) == []
    assert not pd.read_csv(fallback["output_csv"])["model"].str.endswith(chosen).any()
    chosen_path.unlink()  # a missing export is passed over the same way, not a crash
    gone = batch_predict(str(colour_dataset / "test"), output_csv=str(tmp_path / "g.csv"), model=str(version_dir))
    # The next in auto's order: export timed the tampered format again, so the order may differ from before.
    left = [name for name in serving_exports(read_json(version_dir / "manifest.json")) if name != chosen]
    assert gone["model"].endswith(f"({left[0]})" if left else "v1") and gone["ok"] == len(keras_csv)


@pytest.mark.real_data
def test_a_tta_models_first_view_exports_in_int8_and_serves_it_first(tiny_on_real_cifar, artifacts, tmp_path):
    """The cascade calibration chose (first view, every view where it is unsure) served over int8 TFLite: measured
    at export as served, listed with its checksum, served by `--engine auto` where it passed parity, else not."""
    source, trained = tiny_on_real_cifar
    shutil.copytree(source, artifacts, dirs_exist_ok=True)
    version_dir = artifacts / Path(trained["path"]).relative_to(source)
    record = read_json(version_dir / "manifest.json")  # a tiny model may be far from what calibration serves
    record["calibration"]["cascade"].update(serves=True, margin=record["calibration"]["cascade"]["margin"] or 0.8)
    write_json(version_dir / "manifest.json", record)
    int8 = export_int8(version_dir, artifacts, cascade_tolerance=1.0)  # and from parity
    view, manifest = int8["first_view"], read_json(version_dir / "manifest.json")
    assert view["file"] == "model_int8_first_view.tflite" and view["parity"] and int8["parity"]
    assert manifest["files"][view["file"]] == sha256_file(version_dir / view["file"])
    for record in (int8, view):  # each with a feature rule of its own, fitted on its own features
        assert manifest["files"][record["features"]["file"]] == sha256_file(version_dir / record["features"]["file"])
    assert int8["features"]["file"] != view["features"]["file"]

    arrays = load_arrays(artifacts / "datasets" / manifest["dataset"]["fingerprint"])
    x_test, y_test = np.asarray(arrays.x_test), np.asarray(arrays.y_test)
    first = TFLiteClassifier(version_dir / view["file"]).predict(x_test)
    every = TFLiteClassifier(version_dir / int8["file"]).predict(x_test)
    scale, margin = cascade_rule(manifest)
    served, unsure = cascade(sharpened(first, scale), lambda rows: every[rows], margin)
    assert view["test_accuracy"] == pytest.approx((served.argmax(axis=1) == y_test).mean(), abs=1e-6)
    assert view["every_view_share"] == pytest.approx(unsure.mean()) and 0 < unsure.mean() < 1

    info = resolve_model(str(version_dir), artifacts)
    assert (info.model_file, info.first_view_file, info.cascade) == (int8["file"], view["file"], (scale, margin))
    # The cascade reads the image's features from the first view, so its rule is the first view's.
    assert info.feature_rule == (view["features"]["file"] if view["features"]["parity"] else "")
    assert load_classifier(info).predict(x_test[:64]) == pytest.approx(served[:64], abs=1e-6)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(8):
        Image.fromarray(x_test[index]).save(photos / f"{index}.png")
    table = pd.read_csv(
        batch_predict(str(photos), output_csv=str(tmp_path / "p.csv"), model=str(version_dir))["output_csv"]
    )
    assert table["model"].str.endswith(f"{int8['file']} ({CASCADE_NOTE})").all()
    assert table["confidence"].to_numpy() == pytest.approx(served[:8].max(axis=1), abs=1e-5)

    # A first view that lost parity, or whose file was tampered with, is passed over: the int8 export serves alone.
    (version_dir / view["file"]).write_bytes(b"tampered")
    tampered = resolve_model(str(version_dir), artifacts)
    assert (tampered.model_file, tampered.first_view_file, tampered.cascade) == (int8["file"], "", None)
    assert any(view["file"] in note for note in tampered.notes)
    # An int8 export from before first views existed gets one when export runs again (no --force needed).
    record = read_json(version_dir / "manifest.json")
    for entry in record["exports"]:
        entry.pop("first_view")
    del record["files"][view["file"]]
    write_json(version_dir / "manifest.json", record)
    int8 = export_int8(version_dir, artifacts, cascade_tolerance=-1.0)
    assert int8["parity"] and not int8["first_view"]["parity"] and verify_version(version_dir) == []
    assert resolve_model(str(version_dir), artifacts).first_view_file == ""


def export_int8(version_dir: Path, artifacts: Path, cascade_tolerance: float, force: bool = False) -> dict:
    """The int8 export's entry, exported with its own parity rules waived and the cascade's tolerance given."""
    waived = {"INT8_MAX_DROP": 1.0, "PARITY_MAX_DROP": 1.0, "PARITY_MIN_AGREEMENT": 0.0}
    with pytest.MonkeyPatch.context() as rules:
        for name, value in {**waived, "CASCADE_TOLERANCE": cascade_tolerance}.items():
            rules.setattr(model_lib.export, name, value)
        (int8,) = export_version(version_dir, artifacts, ("int8",), log=lambda message: None, force=force)
    return int8


@pytest.mark.real_data
def test_an_export_flags_by_the_networks_features_with_a_rule_fitted_on_its_own(
    prefect_harness, tiny_on_real_cifar, artifacts, tmp_path
):
    """Exports report the image's own features and carry a rule fitted on them: served by one, out_of_distribution
    still catches the checkerboards and text that pixel texture misses (22% and 4% by texture alone)."""
    source, trained = tiny_on_real_cifar
    shutil.copytree(source, artifacts, dirs_exist_ok=True)
    version_dir = artifacts / Path(trained["path"]).relative_to(source)
    logged = []
    with pytest.MonkeyPatch.context() as rules:
        # tiny's 200 test images: each near-tie that float16's rounding flips moves accuracy 0.5 points, past the 0.3
        # the rule allows (seen once in CI); agreement (98%, four images) stays the rule.
        rules.setattr(model_lib.export, "PARITY_MAX_DROP", 0.011)
        (float16,) = export_version(version_dir, artifacts, ("float16",), log=logged.append)
    features, manifest = float16["features"], read_json(version_dir / "manifest.json")
    assert features["file"] == feature_rule_file(float16["file"]) == "model_float16.ood.npz"
    assert manifest["files"][features["file"]] == sha256_file(version_dir / features["file"])
    assert "its own feature rule flags" in logged[-1]

    # What the entry records is what the export and its rule do on the test images, against the Keras model's rule.
    arrays = load_arrays(artifacts / "datasets" / manifest["dataset"]["fingerprint"])
    # The rule was fitted on the version's own split, made again from its config: the one its run trained on.
    (run_split_file,) = (artifacts / "runs").glob("*/split.npz")
    again = run_split(np.asarray(arrays.y_train), manifest["config"]["validation_split"], manifest["config"]["seed"])
    assert np.array_equal(again.val_index, load_split(run_split_file).val_index)
    x_test = np.asarray(arrays.x_test)
    keras_rule = FeatureRule.load(version_dir / "ood.npz")
    network = unwrap_tta(load_verified_model(version_dir))[0]
    keras_outside = keras_rule.outside(
        classified(KerasClassifier(with_features(network, keras_rule.layers)), x_test)[1]
    )
    own = FeatureRule.load(version_dir / features["file"])
    outside = own.outside(classified(TFLiteClassifier(version_dir / float16["file"]), x_test)[1])
    assert features["flagged"] == pytest.approx(outside.mean()) and features["keras_flagged"] == keras_outside.mean()
    assert features["agreement"] == pytest.approx((outside == keras_outside).mean())
    assert features["parity"] and float16["parity"]  # float16's features are Keras' to three digits
    assert features["flagged"] <= 0.1  # few real photos: the unlike images below are told apart, not all flagged

    info = resolve_model(str(version_dir), artifacts)  # auto serves the export, with its own rule
    assert (info.model_file, info.feature_rule) == (float16["file"], features["file"])
    synthetic = write_unlike_images(tmp_path / "unlike")
    table = pd.read_csv(batch_predict(str(synthetic), model=str(version_dir))["output_csv"])
    assert table["model"].str.endswith(float16["file"]).all()
    kinds = table["path"].str.rsplit("_", n=1).str[0]
    for kind in UNLIKE_KINDS:
        assert (table["flag"][kinds == kind] == "out_of_distribution").mean() >= 0.97, kind

    # An export from before exports reported features serves by texture alone, and says so.
    old = json.loads(json.dumps(manifest))
    del old["exports"][0]["features"]
    write_json(version_dir / "manifest.json", old)
    info = resolve_model(str(version_dir), artifacts)
    assert info.feature_rule == "" and any("reports no features" in note for note in info.notes)
    logged.clear()  # and export, run again, converts it again with them
    (again,) = export_version(version_dir, artifacts, ("float16",), log=logged.append)
    assert any(line.startswith("float16: ") for line in logged) and again["features"]["parity"]
    assert resolve_model(str(version_dir), artifacts).feature_rule == features["file"]
    # The export's rule is a file of the version: checked before it is used.
    (version_dir / features["file"]).write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match=r"model_float16\.ood\.npz: checksum differs"):
        load_classifier(resolve_model(str(version_dir), artifacts))


@pytest.mark.real_data
def test_onnx_exports_compute_what_tflite_does_and_serve_under_engine_onnx(tiny_on_real_cifar, artifacts, tmp_path):
    """ONNX float32, converted from the float32 TFLite export, gives its probabilities and features; ONNX Runtime's
    int8 is held to TFLite int8's rules against it; `--engine onnx` serves the fastest that passed, checksums
    verified, and `auto` keeps TFLite."""
    source, trained = tiny_on_real_cifar
    shutil.copytree(source, artifacts, dirs_exist_ok=True)
    version_dir = artifacts / Path(trained["path"]).relative_to(source)
    reference = f"{trained['name']}@v{trained['version']}"
    with pytest.raises(RegistryError, match=rf"{reference} has no ONNX export .* --formats onnx,onnx_int8"):
        resolve_model(str(version_dir), artifacts, engine="onnx")

    lines = []
    float32, onnx, int8 = export_version(version_dir, artifacts, ("float32", "onnx", "onnx_int8"), log=lines.append)
    manifest = read_json(version_dir / "manifest.json")
    assert (onnx["file"], int8["file"]) == ("model.onnx", "model_int8.onnx") and verify_version(version_dir) == []
    assert {onnx["file"], int8["file"], onnx["features"]["file"]} <= set(manifest["files"])
    arrays = load_arrays(artifacts / "datasets" / manifest["dataset"]["fingerprint"])
    x_test = np.asarray(arrays.x_test)
    tflite_probabilities, tflite_features = TFLiteClassifier(version_dir / float32["file"]).classify(x_test)
    probabilities, features = OnnxClassifier(version_dir / onnx["file"]).classify(x_test)
    assert probabilities == pytest.approx(tflite_probabilities, abs=1e-5)  # 6e-7 on this host
    for mine, theirs in zip(features, tflite_features, strict=True):  # every stage the feature rule scores
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-3)
    assert onnx["status"] == "ok" and onnx["parity"] and onnx["agreement"] >= 0.995
    quantized = {node.op_type for node in __import__("onnx").load(str(version_dir / int8["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= quantized  # really int8, not float32 again
    assert (int8["status"] == "ok") is (int8["test_accuracy"] >= onnx["test_accuracy"] - model_lib.export.INT8_MAX_DROP)
    assert any(line.startswith("onnx_int8: ") for line in lines)

    served = "model_int8.onnx" if int8["parity"] else "model.onnx"
    info = resolve_model(str(version_dir), artifacts, engine="onnx")
    assert info.model_file == served and info.version.endswith(f"({served})")
    assert resolve_model(str(version_dir), artifacts).model_file.endswith(".tflite")  # auto: TFLite first
    assert resolve_model(str(version_dir / "model.onnx"), artifacts).model_file == "model.onnx"  # a file named
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(8):
        Image.fromarray(x_test[index]).save(photos / f"{index}.png")
    done = batch_predict(str(photos), output_csv=str(tmp_path / "p.csv"), model=str(version_dir), engine="onnx")
    table = pd.read_csv(done["output_csv"])
    assert done["ok"] == 8 and table["model"].str.endswith(f" {served}").all()
    expected = OnnxClassifier(version_dir / served).predict(x_test[:8]).max(axis=1)
    assert table["confidence"].to_numpy() == pytest.approx(expected, abs=1e-5)

    (version_dir / "model.onnx").write_bytes(b"tampered")  # a file that fails its checksum never serves
    if served == "model.onnx":
        with pytest.raises(RegistryError, match="model.onnx"):
            resolve_model(str(version_dir), artifacts, engine="onnx")
    else:
        assert resolve_model(str(version_dir), artifacts, engine="onnx").model_file == served


def test_gelu_converts_to_onnx(tmp_path):
    """airbench's GELU (the exact form) is one TFLite op, which tf2onnx 1.17 cannot convert by itself."""
    import keras

    from model_lib.export import convert, write_saved_model
    from model_lib.onnx_export import convert_onnx

    inputs = keras.Input((6,), name="pixels")
    model = keras.Model(inputs, keras.layers.Activation("gelu")(inputs))
    values = np.linspace(-4, 4, 60, dtype=np.float32).reshape(10, 6)
    (tmp_path / "m.tflite").write_bytes(convert(write_saved_model(model, tmp_path / "saved"), "float32", values))
    convert_onnx(tmp_path / "m.tflite", tmp_path / "m.onnx")
    assert "Erf" in {node.op_type for node in __import__("onnx").load(str(tmp_path / "m.onnx")).graph.node}
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "m.onnx").predict(values), model(values), atol=1e-5)


def test_onnx_without_its_extra_is_one_line_naming_the_install():
    from model_lib.config import ConfigError
    from model_lib.onnx_export import require_onnx

    with pytest.raises(
        ConfigError, match=r"^--formats onnx needs not_a_module_here, .*pip install 'cifar-pipeline\[onnx\]'$"
    ):
        require_onnx("--formats onnx", ("not_a_module_here", "onnx"))
