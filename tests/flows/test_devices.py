"""Training over several devices (data parallel) on any machine: the CPU split into two devices, under
the backend of this pass (MirroredStrategy on TensorFlow, keras.distribution.DataParallel on JAX). The
model it registers serves like a one-device model."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from model_lib.fileio import read_json

CLI = [sys.executable, "-c", "from flows.cli import main; main()"]


# TensorFlow's MirroredStrategy; JAX's keras.distribution is test_edges.py's data-parallel test (same checks).
@pytest.mark.slow
def test_two_devices_train_a_model_that_serves_like_any_other(colour_dataset, artifacts, tmp_path, prefect_api_env):
    env = {**os.environ, **prefect_api_env, "ARTIFACTS_DIR": str(artifacts), "CIFAR_PIPELINE_CPU_DEVICES": "2"}
    train = [*CLI, "train", "--profile", "smoke", "--data", str(colour_dataset), "--epochs", "3", "--batch-size", "4",
             "--validation-split", "0.25", "--precision", "float32", "--name", "colours"]  # fmt: skip
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = read_json(artifacts / "models" / "colours" / "v1" / "manifest.json")
    training = manifest["training"]
    assert training["device_count"] == 2 and training["device"].startswith("2 CPU devices"), training
    assert manifest["config"]["batch_size"] == 4  # per device: each step's batch of 8 splits evenly over the two
    assert "2 replicas: global batch 8" in done.stdout + done.stderr

    output = tmp_path / "colours.csv"
    env.pop("CIFAR_PIPELINE_CPU_DEVICES")  # served on one device, like any model
    predict = [*CLI, "predict", str(colour_dataset / "test"), "--model", "colours@v1", "--output", str(output)]
    done = subprocess.run(predict, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(output)
    assert len(table) == 12 and set(table["status"]) == {"ok"}
    accuracy = (table["label"] == table["path"].str.split("/").str[0]).mean()
    assert abs(accuracy - manifest["metrics"]["test_accuracy"]) < 1e-9  # the registry's figure, served
