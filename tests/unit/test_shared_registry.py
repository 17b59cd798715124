"""One registry in an object store, shared by processes that share nothing else (each its own cache),
against a real S3-compatible server process: numbers, aliases and the gate hold across them, a
writer killed at any step leaves nothing half-visible, and an outage is retried, then named."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from model_lib.registry import Registry
from model_lib.stores import STORE_LOG, STORE_SECONDS_ENV, StoreError, open_store
from model_lib.versions import ChecksumError, RegistryError, load_verified_model, verify_version
from tests.conftest import REPO
from tests.unit.test_registry import make_model_files, manifest, run_at_once, unchecked_load


@pytest.fixture
def files(tmp_path):
    return make_model_files(tmp_path / "run")


def bucket_keys(s3_server, url: str) -> list[str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"].removeprefix(prefix + "/") for item in listed.get("Contents", []))


def test_a_version_lands_in_the_bucket_and_loads_from_a_verified_local_copy(s3_artifacts, s3_server, files, tmp_path):
    registration = Registry(s3_artifacts).register(files, manifest(0.5))
    assert (registration.version, registration.champion) == (1, True)
    keys = bucket_keys(s3_server, s3_artifacts)
    assert {"models/cifar10/registry.json", "models/cifar10/v1/manifest.json", "models/cifar10/v1/model.keras",
            "models/cifar10/.claims/v1"} <= set(keys)  # fmt: skip
    assert not (tmp_path / "artifacts").exists()  # nothing shared went to a local ARTIFACTS_DIR
    # Another machine: an empty cache of its own.
    os.environ["CIFAR_PIPELINE_CACHE"] = str(tmp_path / "other-cache")
    copy = Registry(s3_artifacts).resolve("champion")
    assert copy.is_relative_to(tmp_path / "other-cache") and verify_version(copy) == []
    assert load_verified_model(copy).count_params() == 147


def test_verify_reads_the_store_not_this_machines_verified_copy(s3_artifacts, s3_server, files, tmp_path):
    """A copy verified yesterday says nothing of the bucket today: `models verify` hashes the store's objects, and a
    copy whose source changed is dropped, so no later command serves it."""
    from typer.testing import CliRunner

    from flows.cli import app

    Registry(s3_artifacts).register(files, manifest(0.5))
    cached = Registry(s3_artifacts).resolve("v1")  # this machine's verified copy
    verified = CliRunner().invoke(app, ["models", "verify", "cifar10@v1"])
    assert verified.exit_code == 0 and verified.output.strip() == (
        f"OK {s3_artifacts}/models/cifar10/v1: every checksum matches"
    ), verified.output
    bucket, _, prefix = s3_artifacts.removeprefix("s3://").partition("/")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/models/cifar10/v1/metrics.json", Body=b"{}")
    refused = CliRunner().invoke(app, ["models", "verify", "cifar10@v1"])
    assert refused.exit_code == 1, refused.output
    assert f"FAILED {s3_artifacts}/models/cifar10/v1/metrics.json: checksum differs" in refused.output
    assert not cached.exists()  # dropped: nothing reads the stale copy again
    with pytest.raises(ChecksumError, match="metrics.json"):
        Registry(s3_artifacts).resolve("v1")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/models/cifar10/v1/manifest.json", Body=b'{"files"')
    truncated = CliRunner().invoke(app, ["models", "verify", "cifar10@v1"])
    assert str(truncated.exception) == (
        f"{s3_artifacts}/models/cifar10/v1/manifest.json: not valid JSON (Expecting ':' delimiter: line 1 column 9 "
        "(char 8)): truncated or edited; restore it from a copy"
    )
    with pytest.raises(RegistryError, match=r"no version is champion yet; registered here: cifar10 \(name one"):
        Registry(s3_artifacts, "digits").resolve("champion")  # the store's registries, named


def test_the_guides_object_store_steps_run_as_written(s3_server, tmp_path):
    """docs/registry.md's bucket step and first command, as written, against the test server (its endpoint and
    credentials in place of the guide's `export` line): a new user's first commands must not fail."""
    guide = (REPO / "docs" / "registry.md").read_text().split("## One registry for several machines")[1]
    block = guide.split("```bash\n")[1].split("```")[0].splitlines()
    assert block[0].startswith("export AWS_ENDPOINT_URL=")
    create, listing = block[1], block[2]
    env = {**os.environ, **s3_server.env, "CIFAR_PIPELINE_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    env.pop("ARTIFACTS_DIR")
    for command in (create, listing):
        done = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, (command, done.stdout, done.stderr[-2000:])
    assert done.stdout.strip() == "cifar10: no versions registered under s3://team-models/cifar/models/cifar10"


def _register_from_own_cache(url: str, cache: str, files: dict, accuracy: float, queue) -> None:
    os.environ["CIFAR_PIPELINE_CACHE"] = cache
    queue.put(Registry(url).register(files, manifest(accuracy), load_check=unchecked_load).version)


@pytest.mark.slow
def test_eight_processes_with_their_own_caches_register_at_once_and_none_is_lost(s3_artifacts, files, tmp_path):
    machines = [(s3_artifacts, str(tmp_path / f"cache{i}"), files, 0.5 + i / 100) for i in range(8)]
    versions = sorted(run_at_once(_register_from_own_cache, machines))
    assert versions == list(range(1, 9))
    state = Registry(s3_artifacts).state()
    assert [entry["version"] for entry in state["versions"]] == versions and state["aliases"]["latest"] == 8
    # The gate ran against the champion each writer read last: the champion is the best of them all.
    best = max(state["versions"], key=lambda entry: entry["test_accuracy"])["version"]
    assert state["aliases"]["champion"] == best
    latest_moves = [move["to"] for move in state["history"] if move["alias"] == "latest"]
    assert latest_moves == sorted(set(latest_moves)) and latest_moves[-1] == 8  # only ever forward


def _promote_or_score(url: str, cache: str, version: int, queue) -> None:
    os.environ["CIFAR_PIPELINE_CACHE"] = cache
    registry = Registry(url)
    registry.promote(f"v{version}", f"canary {version} passed")
    registry.record_score(version, f"testset-{version}", {"accuracy": 0.5, "loss": 1.0, "count": 10})
    queue.put(version)


@pytest.mark.slow
def test_alias_moves_and_scores_from_several_processes_are_all_kept(s3_artifacts, files, tmp_path):
    registry = Registry(s3_artifacts)
    for accuracy in (0.5, 0.4, 0.3, 0.2):
        registry.register(files, manifest(accuracy))
    run_at_once(_promote_or_score, [(s3_artifacts, str(tmp_path / f"c{v}"), v) for v in (2, 3, 4)])
    state = registry.state()
    promotions = [move["to"] for move in state["history"] if move["action"] == "promote"]
    assert sorted(promotions) == [2, 3, 4] and state["aliases"]["champion"] == promotions[-1]
    assert all(f"testset-{v}" in state["versions"][v - 1]["scores"] for v in (2, 3, 4))


KILLER = """
import json, os, sys
import model_lib.registry as registry
from tests.unit.test_registry import manifest, unchecked_load

step = sys.argv[1]
registry._crash_point = lambda at: os.kill(os.getpid(), 9) if at == step else None
files = json.loads(sys.argv[2])
registry.Registry(os.environ["ARTIFACTS_DIR"]).register(files, manifest(0.9), load_check=unchecked_load)
"""


@pytest.mark.parametrize(("step", "listed"), [("uploading", False), ("renamed", True)])
@pytest.mark.slow
def test_a_writer_killed_mid_registration_leaves_the_registry_valid_and_the_next_one_cleans_up(
    s3_artifacts, s3_server, files, tmp_path, step, listed
):
    registry = Registry(s3_artifacts)
    registry.register(files, manifest(0.5))
    paths = json.dumps({name: str(path) for name, path in files.items()})
    killed = subprocess.run([sys.executable, "-c", KILLER, step, paths], cwd=Path.cwd(),
                            env={**os.environ, "CIFAR_PIPELINE_CACHE": str(tmp_path / "killed-cache")},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = registry.state()  # still valid, v1 still champion, v2 not visible
    assert [entry["version"] for entry in state["versions"]] == [1] and state["aliases"]["champion"] == 1
    with pytest.raises(Exception, match="no such version"):
        registry.resolve("v2")
    assert any(key.startswith("models/cifar10/v2/") for key in bucket_keys(s3_server, s3_artifacts))

    after = registry.register(files, manifest(0.6))
    state = registry.state()
    versions = [entry["version"] for entry in state["versions"]]
    assert after.version == 3 and versions == ([1, 2, 3] if listed else [1, 3])  # 2 is never reused
    if listed:  # its manifest had landed: listed as recovered, never gated into champion
        assert "recovered" in state["versions"][1]["gate"] and verify_version(registry.version_dir(2)) == []
    else:  # the partial upload is gone; the claim stays, marked abandoned
        keys = bucket_keys(s3_server, s3_artifacts)
        assert not any(key.startswith("models/cifar10/v2/") for key in keys)
        assert "abandoned" in json.loads(open_store(s3_artifacts).read("models/cifar10/.claims/v2"))
    for version in versions:
        assert verify_version(registry.version_dir(version)) == []


def test_a_file_tampered_with_in_the_bucket_is_refused_on_promotion_and_on_a_fresh_load(
    s3_artifacts, s3_server, files, tmp_path
):
    registry = Registry(s3_artifacts)
    registry.register(files, manifest(0.5))
    registry.register(files, manifest(0.4))
    bucket, _, prefix = s3_artifacts.removeprefix("s3://").partition("/")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/models/cifar10/v2/model.keras", Body=b"tampered")
    with pytest.raises(ChecksumError, match=r"v2/model\.keras: checksum differs"):
        registry.promote("v2", "try it")
    assert registry.state()["aliases"]["champion"] == 1
    os.environ["CIFAR_PIPELINE_CACHE"] = str(tmp_path / "fresh-cache")
    with pytest.raises(ChecksumError, match=r"model\.keras: checksum differs"):
        Registry(s3_artifacts).resolve("v2")


@pytest.mark.slow
def test_a_short_outage_is_retried_and_a_lasting_one_is_one_clear_error(
    s3_artifacts, s3_server, files, monkeypatch, caplog
):
    registry = Registry(s3_artifacts)
    registry.register(files, manifest(0.5))
    monkeypatch.setenv(STORE_SECONDS_ENV, "20")
    monkeypatch.setattr(STORE_LOG, "propagate", True)  # to caplog, whatever a CLI test in this process set
    s3_server.gate.close()
    threading.Timer(2.0, s3_server.gate.open).start()
    started = time.monotonic()
    with caplog.at_level("WARNING", STORE_LOG.name):
        assert registry.register(files, manifest(0.6)).version == 2  # went through once the store was back
    assert time.monotonic() - started >= 1.5
    # One line (its text); caplog may hold a record twice in the full suite, where a CLI test ran in this process.
    (waiting,) = {record.getMessage() for record in caplog.records if record.name == STORE_LOG.name}
    assert waiting.startswith(f"{s3_artifacts}/") and "the object store is not answering" in waiting  # said once,
    # however many of the registration's parallel uploads waited
    assert waiting.endswith(f"trying again for up to 20 s ({STORE_SECONDS_ENV})"), waiting

    monkeypatch.setenv(STORE_SECONDS_ENV, "3")
    s3_server.gate.close()
    try:
        with pytest.raises(StoreError, match=r"models/cifar10/registry\.json: the object store did not answer for 3 s"):
            registry.promote("v1", "back to v1")
    finally:
        s3_server.gate.open()
    state = registry.state()  # the champion is untouched, nothing half-written
    assert state["aliases"]["champion"] == 2 and [e["version"] for e in state["versions"]] == [1, 2]


def test_storage_urls_are_checked_before_any_work(monkeypatch):
    for url, problem in (("gs://bucket/x", "unsupported storage URL scheme 'gs'"), ("s3:///x", "needs a bucket")):
        with pytest.raises(StoreError, match=problem):
            Registry(url)
