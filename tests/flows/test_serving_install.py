"""The serving install: the core package without the `train` extra (no TensorFlow, no Keras), as `make
install-serve` builds it in `.venv-serve` from requirements-serve.lock, runs `predict` and `app` on a version
exported by the full install, from a local registry and from one in an object store, with the full install's
labels, confidences and flags; and says in one line what it cannot do."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pandas as pd
import pytest

from model_lib.fileio import read_json
from model_lib.serving import serving_export
from tests.conftest import REPO
from tests.flows.test_shared_storage import upload_folder
from tests.s3server import environment

SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
CLI = ["-c", "from flows.cli import main; main()"]
SAME = ["path", "status", "label", "confidence", "flag", "top1_label", "top2_label", "top3_label"]


@pytest.fixture(scope="module")
def serve_python() -> Path:
    """`.venv-serve`'s Python; absent, the tests skip on a developer's machine and fail under CI=true."""
    if not SERVE_PYTHON.is_file():
        message = f"{SERVE_PYTHON} not found: `make install-serve` builds the serving install"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    lacks = subprocess.run([str(SERVE_PYTHON), "-c", "import importlib.util as u; print(u.find_spec('tensorflow'), "
                            "u.find_spec('keras'))"], capture_output=True, text=True, check=True)  # fmt: skip
    assert lacks.stdout.split() == ["None", "None"], "the serving install must have neither TensorFlow nor Keras"
    return SERVE_PYTHON


def predict(python, images: Path, output: Path, env: dict, *options: str) -> pd.DataFrame:
    command = [str(python), *CLI, "predict", str(images), "--model", "colours", "--output", str(output), *options]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return pd.read_csv(output, keep_default_na=False)


@pytest.mark.slow
def test_the_serving_install_predicts_and_serves_an_export_as_the_full_install_does(
    serve_python, trained_and_exported, tmp_path, prefect_api_env, s3_server
):
    source, result = trained_and_exported
    images = source.parent / "colours" / "test"
    env = {**os.environ, **prefect_api_env, "ARTIFACTS_DIR": str(source), "CIFAR_PIPELINE_CACHE": str(tmp_path)}
    full = predict(os.sys.executable, images, tmp_path / "full.csv", env)
    served = predict(serve_python, images, tmp_path / "serve.csv", env)
    chosen = serving_export(read_json(Path(result["path"]) / "manifest.json"))  # auto: the fastest export here
    assert chosen and served["model"].str.endswith(chosen).all()  # the export, on LiteRT
    pd.testing.assert_frame_equal(served[SAME], full[SAME])

    # The same version in an object store: the registry folder uploaded as it is.
    url = f"s3://{s3_server.new_bucket()}/team"
    upload_folder(s3_server, source / "models", f"{url}/models")
    remote = {**os.environ, **environment(s3_server, url, tmp_path / "cache"), **prefect_api_env}
    from_store = predict(serve_python, images, tmp_path / "store.csv", remote)
    pd.testing.assert_frame_equal(from_store[SAME], full[SAME])

    # The app, too: one image, the CSV's answer.
    command = [str(serve_python), *CLI, "app", "--model", "colours", "--port", "0"]
    app = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = app.stdout.readline()  # serving colours (colours v1 (model_int8.tflite)) at http://...
        assert f"({chosen})) at http://127.0.0.1:" in line, (line, app.stderr.read() if app.poll() else "")
        url = line.split(" at ")[1].split()[0].rstrip("/")
        first = full.iloc[0]
        with open(images / first["path"], "rb") as image:
            answer = httpx.post(f"{url}/api/predict", files=[("file", (first["path"], image.read()))], timeout=60)
        assert answer.status_code == 200, answer.text
        row = answer.json()["predictions"][0]
        assert row["label"] == first["label"] and abs(row["confidence"] - first["confidence"]) < 1e-6
    finally:
        app.terminate()
        app.wait(timeout=30)

    # What needs Keras says so in one line, before any work.
    for arguments in (["train", "--profile", "tiny"], ["export", "colours", "--force"],
                      ["predict", str(images), "--model", "colours", "--engine", "keras"]):  # fmt: skip
        done = subprocess.run([str(serve_python), *CLI, *arguments], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 1, (arguments, done.stderr[-2000:])
        (line,) = [line for line in done.stderr.splitlines() if line.strip()]
        assert line.startswith("error: ") and line.endswith(
            "needs keras and tensorflow, which this install does not have: pip install 'cifar-pipeline[train]'"
        ), (arguments, line)
    # A deployment's run, on a worker with this install, says the same (not a ModuleNotFoundError from deep inside).
    run = f"from flows.batch_predict import batch_predict as f; f({str(images)!r}, model='colours', engine='keras')"
    done = subprocess.run([str(serve_python), "-c", run], env=env, capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode == 1 and "ModuleNotFoundError" not in said, said[-3000:]
    assert "MissingTrainingInstall: serving colours v1 from model.keras (a TFLite export" in said, said[-3000:]
