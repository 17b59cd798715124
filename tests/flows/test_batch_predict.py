"""The batch-predict flow on a catalogue of broken and odd files, and on real CIFAR-10 images."""

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tasks.prediction
from flows.batch_predict import PredictionErrors, batch_predict, with_dask
from model_lib.images import decode_rgb
from model_lib.models import build_model
from model_lib.prediction_csv import csv_columns
from model_lib.sources import CIFAR10_CLASSES
from model_lib.versions import ChecksumError, RegistryError, load_verified_model
from tests.catalogue import BROKEN, ODD, SKIPPED, build_catalogue
from tests.registered import register_keras_model
from tests.synthetic import UNLIKE_KINDS, write_unlike_images


@pytest.fixture
def registered(artifacts, tmp_path):
    return register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)


@pytest.fixture
def catalogue(tmp_path):
    return build_catalogue(tmp_path / "inbox", tmp_path / "outside")


def test_every_broken_file_gets_an_error_row_and_every_odd_one_is_classified(
    prefect_harness, registered, catalogue, tmp_path
):
    output = tmp_path / "out" / "predictions.csv"
    finished = batch_predict(str(catalogue), output_csv=str(output), shard_size=5, return_state=True)
    summary = finished.result()
    ok, errors = summary["ok"], summary["error"]
    assert finished.message == f"{ok} ok ({summary['flagged']} flagged unsure), {errors} error -> {output}"
    table = pd.read_csv(output, keep_default_na=False)
    assert list(table.columns) == csv_columns(3)
    assert table["path"].tolist() == sorted(BROKEN | ODD) == sorted(table["path"])
    rows = table.set_index("path")
    for name, words in BROKEN.items():
        assert rows.loc[name, "status"] == "error" and words in rows.loc[name, "error"], name
        assert rows.loc[name, "label"] == ""
    for name, (width, height) in ODD.items():
        row = rows.loc[name]
        assert row["status"] == "ok" and row["error"] == "", (name, row["error"])
        assert (int(row["width"]), int(row["height"])) == (width, height), name
        assert row["label"] in CIFAR10_CLASSES and row["label"] == row["top1_label"]
        assert float(row["top1_probability"]) >= float(row["top2_probability"]) >= float(row["top3_probability"])
    assert (summary["ok"], summary["error"], summary["skipped"]) == (len(ODD), len(BROKEN), len(SKIPPED))
    assert summary["model"] == "cifar10 v1"
    assert summary["images_per_second"] == pytest.approx(len(BROKEN | ODD) / summary["seconds"], rel=0.02)
    assert not list(output.parent.glob(".*"))  # no parts or temporary files left beside the CSV


def test_fail_on_error_fails_the_run_after_writing_the_csv(prefect_harness, registered, catalogue, tmp_path):
    output = tmp_path / "strict.csv"
    with pytest.raises(PredictionErrors, match=f"{len(BROKEN)} file"):
        batch_predict(str(catalogue), output_csv=str(output), fail_on_error=True)
    assert len(pd.read_csv(output)) == len(BROKEN) + len(ODD)


def test_interrupted_run_leaves_no_partial_csv(prefect_harness, registered, catalogue, tmp_path, monkeypatch):
    output = tmp_path / "previous.csv"
    output.write_text("the previous complete result\n")
    calls = []
    real = tasks.prediction.classify_shard

    def crash_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-run")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.prediction, "classify_shard", crash_on_third_shard)
    with pytest.raises(BaseException):  # noqa: B017 - whatever Prefect wraps the interrupt in
        batch_predict(str(catalogue), output_csv=str(output), shard_size=4)
    assert output.read_text() == "the previous complete result\n"
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_default_output_and_reference_forms(prefect_harness, registered, catalogue, artifacts):
    results = {}
    for reference in ("cifar10", "cifar10@champion", "cifar10@latest", "cifar10@v1", str(registered)):
        summary = batch_predict(str(catalogue / "odd"), model=reference, top_k=2)
        table = pd.read_csv(summary["output_csv"])
        assert (table["model"] == f"{reference} -> cifar10 v1 model.keras").all()  # provenance: asked and answered
        results[reference] = table.drop(columns="model").to_csv()
        assert summary["model"] == "cifar10 v1"
    outputs = sorted((artifacts / "predictions").iterdir())  # one CSV per run, none overwritten
    assert len(outputs) == 5 and Path(summary["output_csv"]) == outputs[-1]
    assert all(re.fullmatch(r"odd-\d{8}-\d{6}-[0-9a-f]{6}\.csv", path.name) for path in outputs)
    assert len(set(results.values())) == 1
    with pytest.raises(RegistryError, match="no such version"):
        batch_predict(str(catalogue), model="cifar10@v5")


def test_a_shard_whose_decoding_hangs_fails_the_run_at_its_time_limit(
    prefect_harness, registered, catalogue, tmp_path, monkeypatch
):
    """A decoding process that stops answering (SIGSTOP stands in for a read from a disk that hangs) once held the
    run forever: Prefect's own task timeout cannot interrupt a shard in a worker thread. The shard's own limit,
    3 s here, ends the run Failed soon after, and kills the stuck processes so that the next run starts fresh."""
    import flows.batch_predict
    import model_lib.predict

    monkeypatch.setattr(flows.batch_predict, "SHARD_TIMEOUT_FLOOR_SECONDS", 3)
    monkeypatch.setattr(flows.batch_predict, "SHARD_SECONDS_PER_IMAGE", 0.01)
    model_lib.predict.reset_workers()
    pool = model_lib.predict.decode_pool()
    for future in [pool.submit(int) for _ in range(os.cpu_count() or 1)]:  # every decoding process started
        future.result()
    stuck = list(pool._processes.values())
    for process in stuck:
        os.kill(process.pid, signal.SIGSTOP)
    started = time.monotonic()
    state = batch_predict(str(catalogue / "odd"), output_csv=str(tmp_path / "never.csv"), return_state=True)
    took = time.monotonic() - started
    assert state.is_failed() and "ran past its time limit of 3 s and was stopped" in state.message, state.message
    assert took < 3 + 15, took  # the limit, then the run's own start and end
    assert not (tmp_path / "never.csv").exists()
    for process in stuck:
        process.join(timeout=10)
        assert process.exitcode == -signal.SIGKILL  # killed, not left stopped
    summary = batch_predict(str(catalogue / "odd"), output_csv=str(tmp_path / "after.csv"))
    assert summary["ok"] == len(ODD)


def test_tampered_model_fails_the_run_with_the_file_named(prefect_harness, registered, catalogue, tmp_path):
    # The model loads in the background at flow start; its failure must still reach the run.
    model_file = registered / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"x")
    with pytest.raises(ChecksumError, match=r"model\.keras: checksum differs"):
        batch_predict(str(catalogue), output_csv=str(tmp_path / "never.csv"), model=str(registered))
    assert not (tmp_path / "never.csv").exists()


@pytest.mark.slow
def test_dask_and_thread_pool_write_identical_csvs(prefect_harness, registered, catalogue, tmp_path):
    threads, dask = tmp_path / "threads.csv", tmp_path / "dask.csv"
    batch_predict(str(catalogue), output_csv=str(threads), shard_size=4)
    with_dask(workers=2)(str(catalogue), output_csv=str(dask), shard_size=4)
    assert threads.read_bytes() == dask.read_bytes()


@pytest.mark.real_data
@pytest.mark.slow
def test_upscaled_photos_get_the_models_output_on_the_shared_decoding(
    prefect_harness, smoke_on_real_cifar, upscaled_cifar, artifacts
):
    """640x480 photos are classified from the same pixels training ingest decodes (see tests/data)."""
    originals, photos = upscaled_cifar
    _, trained = smoke_on_real_cifar
    from model_lib.predict import CASCADE_NOTE, load_classifier, resolve_model

    rows = pd.read_csv(batch_predict(str(photos), model=trained["path"], engine="keras")["output_csv"])
    assert len(rows) == 300 and (rows["status"] == "ok").all()
    assert (rows[["width", "height"]] == (640, 480)).all().all()
    model = load_verified_model(Path(trained["path"]))
    pixels = np.stack([decode_rgb(photos / path, (32, 32))[0] for path in rows["path"]])
    expected = model.predict(pixels, batch_size=64, verbose=0)  # --engine keras: the saved model itself
    np.testing.assert_allclose(rows["confidence"], expected.max(axis=1), atol=1e-5)
    # --engine auto: the first view first where calibration found that costs at most 0.2 points, as the CSV says.
    auto = pd.read_csv(batch_predict(str(photos), model=trained["path"])["output_csv"])
    info = resolve_model(trained["path"], artifacts)
    serves = json.loads((Path(trained["path"]) / "manifest.json").read_text())["calibration"]["cascade"]["serves"]
    assert (info.cascade is not None) == serves and auto["model"].str.contains(CASCADE_NOTE).all() == serves
    np.testing.assert_allclose(auto["confidence"], load_classifier(info).predict(pixels).max(axis=1), atol=1e-5)
    runner_up = np.sort(expected, axis=1)[:, -2]
    clear = expected.max(axis=1) - runner_up > 1e-5
    class_names = json.loads((Path(trained["path"]) / "manifest.json").read_text())["dataset"]["class_names"]
    names = np.array(class_names)[expected.argmax(axis=1)]
    assert (rows["label"][clear] == names[clear]).all()
    truth = rows["path"].str.split("/").str[0]
    assert (rows["label"] == truth).mean() > 0.2

    # Calibrated and flagged: the temperature is a stock layer of the saved model (its outputs are the
    # ones compared above), and real photos are rarely out of distribution while synthetic images are.
    manifest = json.loads((Path(trained["path"]) / "manifest.json").read_text())
    calibration = manifest["calibration"]
    assert "temperature" in {layer.name for inner in model.layers for layer in getattr(inner, "layers", [])}
    assert calibration["test_ece_after"] < calibration["test_ece_before"]
    assert (rows["flag"] == "out_of_distribution").mean() <= 0.05  # 1.0% (bench/RESULTS.md)
    assert set(rows["flag"]) <= {"ok", "low_confidence", "out_of_distribution"}
    assert (rows["model"] == f"{trained['path']} -> cifar10 v1 model.keras").all()
    # Non-photos of six kinds: pixel texture catches noise, flat colours and ramps; checkerboards and text have a
    # photo's texture, and only the feature-space rule (fitted at calibration, model_lib.ood) catches them.
    assert calibration["feature_rule"]["file"] in manifest["files"]
    synthetic = write_unlike_images(photos.parent / "unlike")
    flagged = pd.read_csv(batch_predict(str(synthetic), model=trained["path"])["output_csv"])
    kinds = flagged["path"].str.rsplit("_", n=1).str[0]
    assert set(kinds) == set(UNLIKE_KINDS)
    for kind in UNLIKE_KINDS:
        assert (flagged["flag"][kinds == kind] == "out_of_distribution").mean() >= 0.97, kind
    # CIFAR-10 test images as they are: rarely out of distribution (1.6% of this model's 1,000).
    as_they_are = pd.read_csv(batch_predict(str(originals), model=trained["path"])["output_csv"])
    assert (as_they_are["flag"] == "out_of_distribution").mean() <= 0.03
    # The rule is a file of the version: checked like the model before it is used.
    copy = Path(shutil.copytree(trained["path"], photos.parent / "copy" / "v1"))
    (copy / "ood.npz").write_bytes((copy / "ood.npz").read_bytes()[:-1] + b"x")
    with pytest.raises(ChecksumError, match=r"ood\.npz: checksum differs"):
        load_classifier(resolve_model(str(copy), artifacts))


def test_a_model_without_an_unsure_rule_says_why_its_flag_column_is_empty(registered, artifacts, tmp_path):
    from model_lib.predict import resolve_model

    assert resolve_model(str(registered), artifacts).notes == (
        "cifar10 v1 has no unsure rule (registered before calibration existed): the flag column stays empty; "
        "--unsure-below P sets one",
    )
    small = json.loads((registered / "manifest.json").read_text())  # as a folder of 40 validation images records it
    small["calibration"] = {"fitted_on": "not fitted: 40 validation images, fewer than 50", "unsure_threshold": None}
    version = tmp_path / "small" / "v1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text(json.dumps(small))
    assert (
        "no unsure rule (not fitted: 40 validation images, fewer than 50)"
        in resolve_model(str(version), artifacts).notes[0]
    )
