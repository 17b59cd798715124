"""A model trained under one Keras backend serves under the other (TensorFlow and JAX).

CI runs this file in both passes (`make test`): under TensorFlow it trains on JAX and serves
here, under JAX (KERAS_BACKEND=jax) the other way round.
"""

import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from model_lib.fileio import read_json
from model_lib.prediction_csv import read_predictions
from model_lib.versions import load_verified_model
from tests.flows.test_readme import readme_command

pytestmark = pytest.mark.backends
OTHER = {"tensorflow": "jax", "jax": "tensorflow"}


def _cli(arguments: list[str], artifacts, backend: str, cwd, prefect_api_env: dict) -> str:
    env = {**os.environ, **prefect_api_env, "ARTIFACTS_DIR": str(artifacts), "KERAS_BACKEND": backend}
    command = [sys.executable, "-c", "from flows.cli import main; main()", *arguments]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (arguments, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


@pytest.mark.slow
@pytest.mark.real_data
def test_a_model_trained_under_one_backend_serves_under_the_other(
    colour_dataset, cifar_dir, artifacts, tmp_path, prefect_api_env
):
    here = keras.backend.backend()
    there = OTHER[here]
    documented = readme_command("KERAS_BACKEND=jax cifar-pipeline train")  # docs/training.md, "Keras backends"
    assert documented[:2] == ["cifar-pipeline", "train"]
    smoke = ["--data", str(colour_dataset), "--epochs", "3", "--batch-size", "8", "--validation-split", "0.25"]
    _cli([*documented[1:], *smoke], artifacts, there, tmp_path, prefect_api_env)  # as written, on the other one
    version_dir = artifacts / "models" / "colours" / "v1"
    manifest = read_json(version_dir / "manifest.json")
    assert manifest["training"]["backend"] == there

    model = load_verified_model(version_dir)  # in this process: checksums verified, safe_mode on
    with np.load(version_dir / "probe.npz") as probe:  # real test images, black, white and noise
        np.testing.assert_allclose(model.predict(probe["inputs"], verbose=0), probe["outputs"], atol=1e-5)

    photos = tmp_path / "photos"  # the test images it was scored on, and real CIFAR-10 photos it never saw
    shutil.copytree(colour_dataset / "test", photos / "colours")
    (photos / "cifar").mkdir()
    for path in sorted((cifar_dir / "test" / "cat").iterdir())[:10]:
        shutil.copyfile(path, photos / "cifar" / path.name)
    tables = {}
    for backend in (here, there):
        output = tmp_path / f"{backend}.csv"
        _cli(["predict", str(photos), "--model", "colours", "--engine", "keras", "--output", str(output)],
             artifacts, backend, tmp_path, prefect_api_env)  # fmt: skip
        tables[backend] = read_predictions(output).sort_values("path", ignore_index=True)
    ours, theirs = tables[here], tables[there]
    assert len(ours) == 22 and set(ours["status"]) == {"ok"} and list(ours["path"]) == list(theirs["path"])
    np.testing.assert_allclose(ours["top1_probability"], theirs["top1_probability"], atol=1e-4)
    np.testing.assert_allclose(ours["top2_probability"], theirs["top2_probability"], atol=1e-4)
    clear = (ours["top1_probability"] - ours["top2_probability"]) > 1e-3  # labels of near-ties may swap
    assert clear.sum() >= 18 and (ours.loc[clear, "label"] == theirs.loc[clear, "label"]).all()
    colours = ours[ours["path"].str.contains("colours")]
    truth = colours["path"].map(lambda path: path.replace("\\", "/").split("/")[-2])
    assert (colours["label"] == truth).mean() == pytest.approx(manifest["metrics"]["test_accuracy"])
