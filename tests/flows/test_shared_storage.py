"""The CLI with ARTIFACTS_DIR in an object store (a real S3-compatible server process on 127.0.0.1),
as a team uses it: machines that share nothing but the bucket, each with its own empty cache and
working folder. One trains into the registry; another classifies with its champion into a CSV in
the bucket; a third promotes and rolls back, and the others see it."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from model_lib.stores import STORE_SECONDS_ENV, StoreError
from tests.s3server import environment


def machine(s3_server, url, tmp_path, name, prefect_api_env):
    """A `cifar-pipeline` on a machine of its own: its own working folder and cache, the shared store."""
    home = tmp_path / name
    home.mkdir()
    env = {**environment(s3_server, url, home / "cache"), **prefect_api_env}

    def run(*arguments: str, expect: int = 0) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *arguments], env=env,
                              cwd=home, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == expect, (arguments, done.stdout[-3000:], done.stderr[-3000:])
        return done

    return run


@pytest.mark.real_data
@pytest.mark.slow
def test_one_machine_trains_into_the_bucket_another_predicts_from_it_a_third_moves_the_champion(
    s3_artifacts, s3_server, cifar_slice, tmp_path, prefect_api_env
):
    trainer, predictor, operator = (machine(s3_server, s3_artifacts, tmp_path, name, prefect_api_env)
                                    for name in ("trainer", "predictor", "operator"))  # fmt: skip
    # tiny on 160 real photos: what is shared, not what is learned. The same files once from the bucket and once
    # from the trainer's disk, deterministic: the same dataset and the same model either way.
    url = f"{s3_artifacts}/data/cifar"
    upload_folder(s3_server, cifar_slice, url)
    options = ["--profile", "tiny", "--precision", "float32", "--deterministic", "--learned-margin", "-1"]
    first = trainer("train", "--data", url, *options).stdout
    assert re.search(r"cifar10 v1 \(champion\)", first), first
    assert f"  {s3_artifacts}/models/cifar10/v1\n" in first, first  # where the registry keeps it, not a cache path
    second = trainer("train", "--data", str(cifar_slice), *options, "--promotion-margin", "1").stdout
    assert re.search(r"cifar10 v2 \(challenger\)", second), second
    assert not (tmp_path / "trainer" / "artifacts").exists()  # nothing shared on the trainer's disk
    from model_lib.registry import Registry

    os.environ["CIFAR_PIPELINE_CACHE"] = str(tmp_path / "reader")
    registry = Registry(s3_artifacts, "cifar10")
    manifests = [json.loads((registry.version_dir(v) / "manifest.json").read_text()) for v in (1, 2)]
    assert manifests[0]["dataset"]["source"] == f"image_folder:{url}"
    assert manifests[0]["dataset"]["fingerprint"] == manifests[1]["dataset"]["fingerprint"]
    assert manifests[0]["metrics"]["test_loss"] == manifests[1]["metrics"]["test_loss"]
    assert manifests[0]["metrics"]["per_class"] == manifests[1]["metrics"]["per_class"]

    inbox = tmp_path / "predictor" / "inbox"
    inbox.mkdir()
    for path in sorted((cifar_slice / "test" / "ship").iterdir())[:8]:
        (inbox / path.name).write_bytes(path.read_bytes())
    output_url = f"{s3_artifacts}/reports/ships.csv"
    predicted = predictor("predict", str(inbox), "--output", output_url).stdout
    assert "8 ok" in predicted and output_url in predicted and "cifar10 v1" in predicted
    bucket, _, key = output_url.removeprefix("s3://").partition("/")
    table = pd.read_csv(io.BytesIO(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()))
    assert len(table) == 8 and set(table["status"]) == {"ok"} and table["model"].str.contains("cifar10 v1").all()
    predictor("predict", str(inbox), "--output", output_url, expect=2)  # never replaced without --overwrite
    upload_folder(s3_server, inbox, f"{s3_artifacts}/inbox")  # an inbox in the bucket: read from there
    default = predictor("predict", f"{s3_artifacts}/inbox").stdout
    assert "8 ok" in default, default
    assert default.strip().splitlines()[-1].strip().startswith(f"{s3_artifacts}/predictions/inbox-"), default
    predictor("predict", f"{s3_artifacts}/no-such-inbox", expect=1)

    operator("models", "promote", "cifar10@v2", "--reason", "canary passed")
    for run in (trainer, predictor):
        assert re.search(r"v2\s+latest,champion", run("models", "list").stdout)
    assert "cifar10 v2" in predictor("predict", str(inbox)).stdout
    operator("models", "rollback", "--reason", "v2 misclassifies ships")
    assert re.search(r"v1\s+champion", predictor("models", "list").stdout)
    assert "OK" in predictor("models", "verify", "cifar10@v2").stdout


def test_a_store_that_cannot_be_used_is_one_error_line(s3_server, tmp_path, prefect_api_env):
    run = machine(s3_server, "gs://bucket/team", tmp_path, "a", prefect_api_env)
    done = run("models", "list", expect=1)
    assert done.stderr.strip() == ("error: gs://bucket/team/models/cifar10: unsupported storage URL scheme 'gs' (use a "
                                   "local path, file://... or s3://bucket/prefix; the registry needs an object store "
                                   "with conditional writes)")  # fmt: skip
    done = machine(s3_server, "s3://no-such-bucket/team", tmp_path, "b", prefect_api_env)("models", "list", expect=1)
    assert done.stderr.strip() == "error: s3://no-such-bucket: no such bucket (create it first)"


@pytest.mark.slow
def test_a_lasting_outage_fails_a_command_with_one_line(s3_artifacts, s3_server, tmp_path, prefect_api_env):
    run = machine(s3_server, s3_artifacts, tmp_path, "a", {**prefect_api_env, STORE_SECONDS_ENV: "5"})
    s3_server.gate.close()
    try:
        done = run("models", "list", expect=1)
    finally:
        s3_server.gate.open()
    one_wait_then_one_error(done.stderr, f"{s3_artifacts}/models/cifar10/registry.json", 5)


def one_wait_then_one_error(stderr: str, where: str, budget: float) -> str:
    """The console of a command whose store stopped answering: one line when it starts waiting (nothing silent for
    the budget's length), one `error:` line when it gives up, nothing else. Returns the error line."""
    waiting, error = stderr.strip().splitlines()
    assert waiting.startswith(f"warning: {where}: the object store is not answering ("), stderr
    assert waiting.endswith(f"); trying again for up to {budget:.0f} s ({STORE_SECONDS_ENV})"), stderr
    assert error.startswith(f"error: {where}: the object store did not answer"), stderr
    return error


def test_missing_credentials_and_a_bad_bucket_name_are_one_error_line(s3_artifacts, s3_server, tmp_path):
    """The most common first-day mistakes with an object store, each one line (they were pages of botocore)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base = {**clean, "HOME": str(tmp_path), "CIFAR_PIPELINE_CACHE": str(tmp_path / "cache"),
            "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip  # no instance-metadata look-up off this machine
    script = [sys.executable, "-c", "from flows.cli import main; main()", "models", "list"]
    cases = {
        "no credentials": ({"ARTIFACTS_DIR": s3_artifacts, "AWS_ENDPOINT_URL": s3_server.endpoint},
                           f"error: {s3_artifacts}/models/cifar10/registry.json: no credentials for the object store: "
                           "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "bad bucket": ({**s3_server.env, "ARTIFACTS_DIR": "s3://Bad_Bucket!/x"},
                       "error: s3://Bad_Bucket!/x/models/cifar10: 'Bad_Bucket!' is not a bucket name"),
    }  # fmt: skip
    for case, (env, expected) in cases.items():
        done = subprocess.run(script, env={**base, **env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.strip().startswith(expected), (case, done.stderr[-2000:])
        assert len(done.stderr.strip().splitlines()) == 1, (case, done.stderr[-2000:])


def test_an_output_in_a_bucket_that_does_not_exist_is_refused_before_any_work(s3_server, artifacts, tmp_path):
    from model_lib.models import build_model
    from tests.registered import register_keras_model

    register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.new("RGB", (32, 32)).save(inbox / "a.png")
    env = {**os.environ, **s3_server.env, "ARTIFACTS_DIR": str(artifacts)}
    command = [sys.executable, "-c", "from flows.cli import main; main()", "predict", str(inbox), "--output",
               "s3://no-such-bucket-here/reports/x.csv", "--overwrite"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: s3://no-such-bucket-here: no such bucket (create it first)"
    ], done.stderr[-2000:]
    assert not (artifacts / "predictions").exists()


@pytest.mark.slow
def test_a_frozen_store_fails_a_command_within_its_budget(s3_artifacts, s3_server, tmp_path, prefect_api_env):
    """A server that accepts connections and never answers (SIGSTOP), unlike a closed port: each request's own
    timeouts and retries must sit inside the store's budget, not add up to minutes (236 s once). The budget is
    5 s here rather than the default 30 s: what is checked is that one request's timeout ends its wait."""
    from model_lib.stores import STORE_READ_SECONDS

    budget = 5
    run = machine(s3_server, s3_artifacts, tmp_path, "a", {**prefect_api_env, STORE_SECONDS_ENV: str(budget)})
    os.kill(s3_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = run("models", "list", expect=1)
        took = time.monotonic() - started
    finally:
        os.kill(s3_server.process.pid, signal.SIGCONT)
    (line,) = done.stderr.strip().splitlines()  # the first request's read timeout outlasts the budget: no retry
    assert line.startswith(f"error: {s3_artifacts}/models/cifar10/registry.json: the object store did not answer")
    assert f"did not answer for {budget} s" in line and took < budget + STORE_READ_SECONDS + 15, took  # 15: its start


def test_a_store_budget_that_is_not_a_number_of_seconds_is_one_error_line(s3_artifacts, s3_server, tmp_path):
    for value in ("inf", "0", "soon"):
        run = machine(s3_server, s3_artifacts, tmp_path, f"budget-{value}", {STORE_SECONDS_ENV: value})
        done = run("models", "list", expect=1)
        assert done.stderr.strip() == (f"error: {STORE_SECONDS_ENV}={value!r}: a number of seconds above 0 and at "
                                       "most 86400"), done.stderr  # fmt: skip


def upload_folder(s3_server, folder: Path, url: str) -> None:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = s3_server.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def test_a_data_folder_in_the_bucket_is_the_same_dataset_as_on_disk(s3_artifacts, s3_server, colour_dataset, tmp_path):
    from model_lib.data import ingest, load_arrays
    from model_lib.settings import work_dir

    url = f"{s3_artifacts}/data/colours"
    upload_folder(s3_server, colour_dataset, url)
    quiet = []
    on_disk = ingest(str(colour_dataset), tmp_path / "machine-a", log=quiet.append)
    in_bucket = ingest(url, work_dir(), log=quiet.append)
    assert in_bucket.fingerprint == on_disk.fingerprint and in_bucket.source == f"image_folder:{url}"
    first, second = load_arrays(on_disk.cache_dir), load_arrays(in_bucket.cache_dir)
    assert all(np.array_equal(getattr(first, name), getattr(second, name)) for name in ("x_train", "y_test"))
    again = ingest(url, work_dir(), log=quiet.append)
    assert again.from_cache and again.fingerprint == in_bucket.fingerprint and "0 file(s) fetched" in quiet[-3]
    before = len(quiet)

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    changed = Image.new("RGB", (32, 32), (0, 0, 0))
    buffer = io.BytesIO()
    changed.save(buffer, format="PNG")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/train/red/000.png", Body=buffer.getvalue())
    s3_server.client().delete_object(Bucket=bucket, Key=f"{prefix}/train/red/001.png")
    updated = ingest(url, work_dir(), log=quiet.append)
    assert "1 file(s) fetched" in " ".join(quiet[before:]) and updated.fingerprint != in_bucket.fingerprint
    assert updated.train_count == in_bucket.train_count - 1

    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/train/red/../../../escape.png", Body=b"x")
    with pytest.raises(StoreError, match="would land outside the local copy"):
        ingest(url, work_dir(), log=quiet.append)
