"""The CLI with ARTIFACTS_DIR in an object store (a real S3-compatible server process on 127.0.0.1),
as a team uses it: machines that share nothing but the bucket, each with its own empty cache and
working folder. One trains into the registry; another classifies with its champion into a CSV in
the bucket; a third promotes and rolls back, and the others see it."""

import io
import re
import subprocess
import sys

import pandas as pd
import pytest

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
    s3_artifacts, s3_server, cifar_dir, tmp_path, prefect_api_env
):
    trainer, predictor, operator = (machine(s3_server, s3_artifacts, tmp_path, name, prefect_api_env)
                                    for name in ("trainer", "predictor", "operator"))  # fmt: skip
    data = ["--data", str(cifar_dir), "--profile", "smoke", "--max-train-images", "1000", "--max-test-images", "300"]
    first = trainer("train", *data).stdout
    assert re.search(r"cifar10 v1 \(champion\)", first), first
    second = trainer("train", *data, "--seed", "1", "--promotion-margin", "1").stdout  # stays a challenger
    assert re.search(r"cifar10 v2 \(challenger\)", second), second
    assert not (tmp_path / "trainer" / "artifacts").exists()  # nothing shared on the trainer's disk

    inbox = tmp_path / "predictor" / "inbox"
    inbox.mkdir()
    for path in sorted((cifar_dir / "test" / "ship").iterdir())[:8]:
        (inbox / path.name).write_bytes(path.read_bytes())
    output_url = f"{s3_artifacts}/reports/ships.csv"
    predicted = predictor("predict", str(inbox), "--output", output_url).stdout
    assert "8 ok" in predicted and output_url in predicted and "cifar10 v1" in predicted
    bucket, _, key = output_url.removeprefix("s3://").partition("/")
    table = pd.read_csv(io.BytesIO(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()))
    assert len(table) == 8 and set(table["status"]) == {"ok"} and table["model"].str.contains("cifar10 v1").all()
    predictor("predict", str(inbox), "--output", output_url, expect=2)  # never replaced without --overwrite
    default = predictor("predict", str(inbox)).stdout.strip().splitlines()[-1].strip()
    assert default.startswith(f"{s3_artifacts}/predictions/inbox-")

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


def test_a_lasting_outage_fails_a_command_with_one_line(s3_artifacts, s3_server, tmp_path, prefect_api_env):
    run = machine(s3_server, s3_artifacts, tmp_path, "a", prefect_api_env)
    s3_server.gate.close()
    try:
        done = run("models", "list", expect=1)
    finally:
        s3_server.gate.open()
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {s3_artifacts}/models/cifar10/registry.json: the object store did not answer")
