"""Adversarial cases at the edges, table-driven: each bad request is refused up front with one clear line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from model_lib.config import ConfigError
from model_lib.models import build_model
from model_lib.precision import JAX_CACHE_FOLDER, machine_cache_dir
from model_lib.predict import plan_prediction
from model_lib.versions import RegistryError
from tests.conftest import TF_STARTUP_NOTES, local_servers
from tests.registered import register_keras_model

CLI = [sys.executable, "-c", "from flows.cli import main; main()"]  # the console script, in this interpreter


def colour_training(colour_dataset, name: str, epochs: int) -> list[str]:
    """A quick `cifar-pipeline train` on the three-colour folder."""
    return [*CLI, "train", "--profile", "smoke", "--data", str(colour_dataset), "--epochs", str(epochs),
            "--batch-size", "8", "--validation-split", "0.25", "--precision", "float32", "--name", name]  # fmt: skip


@pytest.fixture
def setup(artifacts, tmp_path):
    register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(inbox / "photo.jpg")
    (tmp_path / "notes.csv").write_text("my,own,notes\n")
    (tmp_path / "earlier.csv").write_text("path,status,label,confidence,top1_label\n")
    (artifacts / "models" / "broken").mkdir(parents=True)
    (artifacts / "models" / "broken" / "registry.json").write_text('{"versions": [')  # truncated
    return inbox


# (input, --output, other options, error type, words the one line must contain)
PREDICT_CASES = {
    "top-k zero": ("inbox", None, {"top_k": 0}, ConfigError, "--top-k must be at least 1, not 0"),
    "top-k above classes": ("inbox", None, {"top_k": 11}, ConfigError, "--top-k 11 is more than the model's 10"),
    "batch size zero": ("inbox", None, {"batch_size": 0}, ConfigError, "--batch-size must be at least 1"),
    "shard size negative": ("inbox", None, {"shard_size": -5}, ConfigError, "--shard-size must be at least 1"),
    "input is a file": ("inbox/photo.jpg", None, {}, ConfigError, "photo.jpg: not a folder"),
    "input missing": ("nowhere", None, {}, ConfigError, "nowhere: folder not found"),
    "unknown model": ("inbox", None, {"model": "nosuch@v1"}, RegistryError, "nosuch@v1: no such version"),
    "unknown version": ("inbox", None, {"model": "cifar10@v9"}, RegistryError, "no such version"),
    "output over an input image": ("inbox", "inbox/photo.jpg", {}, ConfigError, "an image file name"),
    "output over a file it did not write": ("inbox", "notes.csv", {}, ConfigError, "is not a prediction CSV"),
    "output is a folder": ("inbox", "inbox", {}, ConfigError, "is a folder"),
    "output inside the registry": ("inbox", "artifacts/models/cifar10/v1/manifest.json", {}, ConfigError,
                                   "inside the model registry"),
    "output inside the registry, overwrite": ("inbox", "artifacts/models/cifar10/x.csv", {"overwrite": True},
                                              ConfigError, "inside the model registry"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_bad_prediction_requests_are_refused_before_any_work(setup, tmp_path, artifacts, case):
    source, output, options, error, words = PREDICT_CASES[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    options = {"model": "cifar10", "top_k": 3, "batch_size": 256, "shard_size": 2048, **options}
    with pytest.raises(error, match=words.replace("(", r"\(")):
        plan_prediction(str(tmp_path / source), output and str(tmp_path / output), artifacts_root=artifacts, **options)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_a_device_fifo_or_socket_is_never_an_output_not_even_with_overwrite(setup, tmp_path, artifacts):
    import os
    import socket

    os.mkfifo(tmp_path / "pipe.csv")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "socket.csv"))
    options = dict(model="cifar10", top_k=3, batch_size=256, shard_size=2048, artifacts_root=artifacts, overwrite=True)
    for output in ("/dev/null", str(tmp_path / "pipe.csv"), str(tmp_path / "socket.csv")):
        with pytest.raises(ConfigError, match=r"not a regular file \(a device, FIFO or socket\)"):
            plan_prediction(str(setup), output, **options)
    listener.close()
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_an_earlier_prediction_csv_may_be_replaced_and_overwrite_is_explicit(setup, tmp_path, artifacts):
    options = dict(model="cifar10", top_k=3, batch_size=256, shard_size=2048, artifacts_root=artifacts)
    assert plan_prediction(str(setup), str(tmp_path / "earlier.csv"), **options).output == tmp_path / "earlier.csv"
    notes = tmp_path / "notes.csv"
    assert plan_prediction(str(setup), str(notes), overwrite=True, **options).output == notes


@pytest.mark.parametrize(
    "arguments, code, words",
    [
        (["predict", "{inbox}", "--top-k", "0"], 2, "--top-k must be at least 1"),
        (["predict", "{inbox}", "--output", "{inbox}/photo.jpg"], 2, "an image file name"),
        (["predict", "{inbox}/photo.jpg"], 2, "not a folder"),
        (["predict", "{inbox}", "--model", "nosuch"], 1, "nosuch@champion: no version"),
        (["train", "--profile", "fastest"], 2, "unknown profile 'fastest'; choose from default, gpu, airbench94, seed"),
        (["train", "--architecture", "resnet"], 2, "--architecture 'resnet': choose from airbench, seed_cnn"),
        (["train", "--precision", "half"], 2, "--precision 'half': choose from auto, float32"),
        (["train", "--epochs", "0"], 2, "--epochs must be at least 1, not 0"),
        (["train", "--batch-size", "-8"], 2, "--batch-size must be at least 1, not -8"),
        (["train", "--epochs", "1000000000"], 2, "--epochs must be at most 10,000, not 1,000,000,000"),
        (["train", "--learning-rate", "1e9"], 2, "--learning-rate must be above 0 and at most 100, not 1000000000.0"),
        (["predict", "{inbox}", "--batch-size", "100000"], 2, "--batch-size must be at most 65,536, not 100,000"),
        (["train", "--validation-split", "1.0"], 2, "--validation-split must be in [0, 1), not 1.0"),
        (["train", "--image-size", "large"], 2, "--image-size is a side in pixels or auto, not 'large'"),
        (["train", "--image-size", "8"], 2, "--image-size must be at least 24, not 8"),
        (
            ["train", "--weights", "{inbox}/photo.jpg", "--architecture", "transfer"],
            2,
            "photo.jpg: not a Keras weights file (HDF5 .h5 or .weights.h5)",
        ),
        (["train", "--weights", "{inbox}/none.h5", "--architecture", "transfer"], 2, "none.h5: weights file not found"),
        (["train", "--weights", "imagenet"], 2, "--weights applies to the transfer architecture only, not airbench"),
        (["train", "--data", "{inbox}/missing"], 1, "missing: data folder not found"),
        (["train", "--name", "../escape"], 1, "invalid model name '../escape'"),
        (["train", "--name", "broken"], 1, "broken/registry.json: corrupt registry"),
        (["models", "promote", "cifar10@v1", "--reason", ""], 2, "--reason must say why the champion moves"),
        (["predict", "{inbox}", "--model", "broken@v1"], 1, "broken/registry.json: corrupt registry"),
        (["train", "--max-leakage", "1.5"], 2, "--max-leakage is a fraction in [0, 1], not 1.5"),
        (["train", "--min-class-images", "0"], 2, "--min-class-images must be at least 1, not 0"),
        (["watch"], 2, "watch needs --data, --inbox or both"),
        (["watch", "--inbox", "{inbox}/missing"], 2, "missing: folder not found"),
        (["watch", "--inbox", "{inbox}", "--quiet-seconds", "0"], 2, "--quiet-seconds must be a number at least 0.1"),
        (["watch", "--inbox", "{inbox}", "--quiet-seconds", "inf"], 2, "--quiet-seconds must be a number at least"),
        (
            ["app", "--reload-seconds", "inf"],
            2,
            "--reload-seconds must be a number at least 0.1 and at most 86400, not inf",
        ),
        (["app", "--reload-seconds", "1e-6"], 2, "--reload-seconds must be a number at least 0.1"),
        (["app", "--max-upload-mb", "nan"], 2, "--max-upload-mb must be a number above 0 and at most 100000, not nan"),
        (["train", "--timeout-minutes", "inf"], 2, "--timeout-minutes must be a number above 0 and at most 10080"),
        (["train", "--promotion-margin", "inf"], 2, "--promotion-margin must be a number at least -1 and at most 1"),
        (["train", "--label-smoothing", "nan"], 2, "--label-smoothing must be a number at least 0 and at most 0.999"),
        (["train", "--learned-margin", "-inf"], 2, "--learned-margin must be a number at least -1 and at most 1"),
        (["watch", "--inbox", "{inbox}"], 2, "watch sends events to a server: set PREFECT_API_URL"),
        (["export", "cifar10", "--formats", "int9"], 2, "--formats int9: choose from float32, float16, int8"),
    ],
)
@pytest.mark.slow
def test_the_cli_answers_a_usage_error_in_one_line(setup, arguments, code, words):
    command = [*CLI, *(a.format(inbox=setup) for a in arguments)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # `watch` needs one: here there is none
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1 and words in lines[0], (done.stderr, done.stdout)
    assert "Prefect" not in done.stderr + done.stdout  # refused before any server started (its start logs "Prefect")
    assert Path(setup / "photo.jpg").read_bytes()[:2] == b"\xff\xd8"  # the input image is untouched


def test_a_registry_that_cannot_be_written_is_refused_before_training(colour_dataset):
    # /proc/self takes no new folders, for any user (as root, a chmod'ed folder would still be writable).
    env = {**os.environ, "ARTIFACTS_DIR": "/proc/self/artifacts"}
    done = subprocess.run([*CLI, "train", "--data", str(colour_dataset)], capture_output=True, text=True, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert "the model registry (ARTIFACTS_DIR) is not writable here" in lines[0] and "nothing was started" in lines[0]


@pytest.mark.slow
def test_a_prefect_database_from_another_prefect_version_fails_in_one_line(colour_dataset, tmp_path):
    import sqlite3

    home = tmp_path / "prefect_home"  # as if a newer Prefect had migrated it: a revision this one does not know
    home.mkdir()
    with sqlite3.connect(home / "prefect.db") as db:
        db.execute("create table alembic_version (version_num varchar(32) not null primary key)")
        db.execute("insert into alembic_version values ('ffffffffffff')")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # this command starts the local server
    # The server exits at once; the command says so then, not after the allowance (which would outlast the timeout).
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900"}
    done = subprocess.run([*CLI, "train", "--data", str(colour_dataset)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 2, done.stderr[-3000:]  # the time estimate, then the error
    assert lines[1].startswith("error: Prefect's local server did not start (") and "'ffffffffffff'" in lines[1]
    assert f"its database in {home} may come from another Prefect version: set PREFECT_HOME" in lines[1]


def test_a_prefect_setting_that_does_not_validate_is_named_in_one_line_usage_error(colour_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "abc"}
    done = subprocess.run([*CLI, "train", "--data", str(colour_dataset)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS='abc': input should be a valid integer, unable to "
        "parse string as an integer (Prefect's settings: the environment and its profile)"
    )


@pytest.mark.slow
def test_a_local_server_slower_than_its_allowance_fails_in_one_line_and_is_stopped(colour_dataset, tmp_path):
    # As on 2 busy cores, where CI's run hung until its 600 s timeout: Prefect's start read the stderr of a server
    # still starting. 1 s is shorter than any server start.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    done = subprocess.run([*CLI, "train", "--data", str(colour_dataset)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 2, done.stderr[-3000:]
    assert lines[1] == (
        "error: Prefect's local server did not answer within 1 s (a busy or slow machine): set "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or PREFECT_API_URL to a running server"
    )
    assert local_servers(tmp_path) == []  # the half-started server is not left behind


@pytest.mark.parametrize("arguments", [["export", "cifar10"], ["train", "--export", "--data", "{data}"]])
@pytest.mark.slow
def test_exports_under_another_keras_backend_are_refused_before_any_work(colour_dataset, arguments):
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([*CLI, *(a.format(data=colour_dataset) for a in arguments)], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.stderr, done.stdout)
    assert lines[0].startswith("error: TFLite exports need Keras on TensorFlow, and KERAS_BACKEND is jax")
    assert "Prefect" not in done.stderr + done.stdout  # refused before training started


HOSTILE_NAMES = ['=HYPERLINK("evil.example","y").png', "+1.png", "-2.png", "@SUM(A1).png", "'quoted.png", "plain.png"]


def test_hostile_file_names_are_neutralised_in_the_csv_and_round_trip(prefect_harness, setup, tmp_path):
    import os

    from flows.batch_predict import batch_predict
    from model_lib.prediction_csv import read_predictions

    for name in HOSTILE_NAMES:
        Image.new("RGB", (32, 32), (20, 200, 30)).save(setup / name, format="PNG")
    not_utf8 = os.fsencode(setup) + b"/caf\xe9.png"  # Latin-1 bytes: not valid UTF-8
    with open(not_utf8, "wb") as handle:
        Image.new("RGB", (32, 32)).save(handle, format="PNG")
    Image.new("RGB", (32, 32)).save(setup / "caf\\xe9.png", format="PNG")  # literally backslash, x, e, 9
    output = tmp_path / "hostile.csv"
    summary = batch_predict(str(setup), output_csv=str(output))
    assert (summary["ok"], summary["error"]) == (len(HOSTILE_NAMES) + 3, 0)  # + photo.jpg and the two café names

    raw = pd.read_csv(output, dtype=str, keep_default_na=False)  # what a spreadsheet sees
    assert not [cell for cell in raw.to_numpy().ravel() if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert '\'=HYPERLINK("evil.example","y").png' in set(raw["path"])
    assert "caf\\xe9.png" in set(raw["path"])  # the undecodable byte, escaped
    assert "caf\\\\xe9.png" in set(raw["path"])  # the name with a backslash: its own cell, not the same one
    table = read_predictions(output)
    assert set(HOSTILE_NAMES) <= set(table["path"])  # the project's own reader gets the names back
    assert {os.fsdecode(b"caf\xe9.png"), "caf\\xe9.png"} <= set(table["path"])  # both, as the file system has them
    assert table["width"].dtype.kind == "i" and table["confidence"].dtype.kind == "f"


# TensorFlow pass only: under JAX, determinism is tests/model/test_train.py's, in one process.
@pytest.mark.slow
def test_two_identical_training_commands_at_once_both_register_and_deterministic_ones_agree(
    colour_dataset, artifacts, prefect_api_env
):
    import os

    from model_lib.fileio import read_json
    from model_lib.registry import Registry

    command = [*colour_training(colour_dataset, "twins", epochs=2), "--deterministic"]
    env = {**os.environ, **prefect_api_env, "ARTIFACTS_DIR": str(artifacts)}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    state = Registry(artifacts, "twins").state()
    assert sorted(v["version"] for v in state["versions"]) == [1, 2]
    folders = [p for p in (artifacts / "runs").iterdir() if p.is_dir()]
    assert len(folders) == 2 and all((p / "history.csv").read_text().count("\n") == 3 for p in folders)
    # Same config, seed, data and machine with --deterministic, even at the same moment: the same model.
    metrics = [read_json(artifacts / "models" / "twins" / f"v{v}" / "manifest.json")["metrics"] for v in (1, 2)]
    assert metrics[0]["test_loss"] == metrics[1]["test_loss"] and metrics[0]["per_class"] == metrics[1]["per_class"]


@pytest.mark.slow
def test_a_failed_run_on_the_console_ends_in_one_line_without_tracebacks_or_chatter(tmp_path, artifacts, laptop_env):
    from tests.synthetic import write_uninformative_dataset

    folder = write_uninformative_dataset(tmp_path / "same")
    quiet = ("TF_CPP_MIN_LOG_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED")  # as a terminal has them: unset
    env = {k: v for k, v in laptop_env.items() if k not in quiet}
    command = [
        *CLI,
        "train",
        "--profile",
        "smoke",
        "--data",
        str(folder),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--validation-split",
        "0.5",
        "--max-leakage",
        "1",
        "--min-class-images",
        "1",
    ]  # past the data gates
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**env, "ARTIFACTS_DIR": str(artifacts)}
    )
    console = done.stdout + done.stderr
    assert done.returncode == 1
    errors = [line for line in console.splitlines() if line.startswith("error: ")]
    said = console[-4000:]
    assert len(errors) == 1 and errors[0].startswith("error: the model learned nothing: validation accuracy"), said
    assert "Traceback" not in console and not TF_STARTUP_NOTES.search(console), said
    assert "Task run 'train" in console  # the progress a person needs stays
    assert done.stderr.startswith("Training profile smoke: about 1 min on a 2-core CPU")  # said before Prefect starts


# TensorFlow only: under JAX, tests/model/test_train.py resumes interrupted runs and cut-short checkpoints.
@pytest.mark.slow
def test_a_training_command_killed_mid_epoch_resumes_when_run_again(colour_dataset, artifacts, prefect_api_env):
    import os
    import signal

    from model_lib.runs import read_history

    command = colour_training(colour_dataset, "killed", epochs=12)
    env = {**os.environ, **prefect_api_env, "ARTIFACTS_DIR": str(artifacts)}
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((artifacts / "runs").glob("*/history.csv")):
        time.sleep(0.5)
    history = next((artifacts / "runs").glob("*/history.csv"))

    def epochs_logged() -> int:
        return history.read_text().count("\n") - 1 if history.stat().st_size else 0

    while time.monotonic() < deadline and epochs_logged() < 2:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # no clean-up of any kind; its flow run stays "running" on the server
    first.wait()
    done_before = epochs_logged()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming phase train from checkpoint" in second.stdout + second.stderr
    assert [p for p in (artifacts / "runs").iterdir() if p.is_dir()] == [history.parent]  # the same folder
    assert read_history(history)["epoch"].tolist() == list(range(12)) and done_before >= 2


@pytest.mark.slow
def test_jax_trains_data_parallel_over_devices_that_do_not_divide_the_data(
    tmp_path, artifacts, prefect_api_env, monkeypatch
):
    """Two CPU devices stand in for two GPUs: 27 training and 9 validation images in global batches
    of 16 leave a last batch of 11 and one of 9, and 9 test images make 13 probe images, none of
    which JAX can split in two."""
    import os

    from model_lib.fileio import read_json
    from model_lib.runs import read_history
    from tests.conftest import write_colour_dataset

    colour_dataset = write_colour_dataset(tmp_path / "colours", test_per_class=3)

    env = {**os.environ, **prefect_api_env, "ARTIFACTS_DIR": str(artifacts), "KERAS_BACKEND": "jax",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # fmt: skip
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the tests' shared caches: here, the product's own place
    env.pop("CIFAR_PIPELINE_MACHINE_CACHE")
    monkeypatch.delenv("CIFAR_PIPELINE_MACHINE_CACHE")
    done = subprocess.run(colour_training(colour_dataset, "pair", epochs=2), env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "2 CPU devices (JAX, keras.distribution.DataParallel)" in console
    assert "2 replicas: global batch 16" in console
    manifest = read_json(artifacts / "models" / "pair" / "v1" / "manifest.json")
    assert manifest["training"]["backend"] == "jax" and manifest["metrics"]["epochs_run"] == 2
    assert manifest["training"]["device_count"] == 2 and manifest["config"]["batch_size"] == 8  # per device
    assert manifest["dataset"]["test_count"] == 9  # scored on one device after training, like the probe
    history = read_history(next((artifacts / "runs").glob("*/history.csv")))
    assert len(list((machine_cache_dir() / JAX_CACHE_FOLDER).glob("*-cache"))) > 10  # compiled once, kept
    nines = history["val_accuracy"] * 9  # padding weighted 0: each of the 9 validation images counts once
    assert len(history) == 2 and ((nines - nines.round()).abs() < 1e-5).all(), history
    # Served on one device, like any model: the registry's test accuracy, file by file.
    env.pop("XLA_FLAGS")
    output = tmp_path / "pair.csv"
    predict = [*CLI, "predict", str(colour_dataset / "test"), "--model", "pair@v1", "--output", str(output)]
    done = subprocess.run(predict, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(output)
    accuracy = (table["label"] == table["path"].str.split("/").str[0]).mean()
    assert len(table) == 9 and abs(accuracy - manifest["metrics"]["test_accuracy"]) < 1e-9


def test_the_prediction_reader_keeps_names_and_labels_as_text_and_sizes_as_integers(tmp_path):
    from model_lib.prediction_csv import read_predictions

    path = tmp_path / "p.csv"
    path.write_text(
        "path,status,label,confidence,top1_label,top1_probability,width,height,error\n"
        "'=a.png,ok,01,0.9,01,0.9,32,32,\nNA.png,ok,7,0.8,7,0.8,640,480,\nb.png,error,,,,,,,truncated image\n"
    )
    rows = read_predictions(path).to_dict("records")
    assert [r["path"] for r in rows] == ["=a.png", "NA.png", "b.png"] and rows[0]["label"] == "01"
    assert (rows[1]["width"], rows[1]["height"], rows[1]["confidence"]) == (640, 480, 0.8)
    assert rows[2]["label"] == "" and rows[2]["error"] == "truncated image" and pd.isna(rows[2]["width"])


def test_a_class_name_that_looks_like_a_formula_is_neutralised_too(prefect_harness, tmp_path, artifacts):
    from flows.batch_predict import batch_predict
    from model_lib.prediction_csv import read_predictions

    classes = ["=cmd", "+plus", "plain"]
    register_keras_model(artifacts, build_model("seed_cnn", 3), tmp_path, class_names=classes)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.new("RGB", (32, 32), (9, 99, 199)).save(inbox / "a.png")
    output = tmp_path / "labels.csv"
    batch_predict(str(inbox), output_csv=str(output), top_k=3)
    raw = pd.read_csv(output, dtype=str, keep_default_na=False)
    assert sorted(raw.loc[0, ["top1_label", "top2_label", "top3_label"]]) == ["'+plus", "'=cmd", "plain"]
    assert sorted(read_predictions(output).loc[0, ["top1_label", "top2_label", "top3_label"]]) == sorted(classes)


@pytest.mark.slow
def test_an_unreachable_or_foreign_prefect_api_is_one_line_before_any_work(setup, colour_dataset, artifacts):
    import http.server
    import os
    import socket
    import threading

    class NotPrefect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    foreign = http.server.HTTPServer(("127.0.0.1", 0), NotPrefect)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    try:
        foreign_api = f"http://127.0.0.1:{foreign.server_port}/api"
        cases = ((f"http://127.0.0.1:{dead}/api", "no Prefect server answers there"),
                 (foreign_api, "what answers there is not a Prefect API"))  # fmt: skip
        for api, words in cases:
            env = {**os.environ, "ARTIFACTS_DIR": str(artifacts), "PREFECT_API_URL": api}
            for command in (["train", "--data", str(colour_dataset), "--profile", "smoke"],
                            ["predict", str(setup), "--output", str(artifacts.parent / "never.csv")],
                            ["watch", "--inbox", str(setup)]):  # fmt: skip  # not "Watching", then lost events
                started = time.monotonic()
                done = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=120)
                lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
                assert done.returncode == 1 and lines == [lines[0]] and f"PREFECT_API_URL={api}: {words}" in lines[0]
                assert "Traceback" not in done.stderr and time.monotonic() - started < 60, done.stderr[-2000:]
                assert "Watching" not in done.stdout
                assert not (artifacts / "runs").exists() and not (artifacts.parent / "never.csv").exists()
    finally:
        foreign.shutdown()
