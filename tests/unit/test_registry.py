"""The model registry: gate, aliases and history, checksums, crash safety and concurrency."""

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

import model_lib.registry as registry_module
from model_lib.fileio import read_json, sha256_file
from model_lib.registry import Registry, champion_stack, parse_reference
from model_lib.versions import ChecksumError, RegistryError, load_verified_model, verify_version

MANIFEST_KEYS = {"version", "created_at", "architecture", "parameter_count", "config", "metrics", "dataset", "code",
                 "libraries", "flow_run_id", "files"}  # fmt: skip


def make_model_files(folder: Path, seed: int = 0, wrong_probe: bool = False) -> dict[str, Path]:
    """A tiny real Keras model with its probe, as training would hand them to the registry."""
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")])
    model.save(folder / "model.keras")
    inputs = np.random.default_rng(seed).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    outputs = model.predict(inputs, verbose=0) + (0.5 if wrong_probe else 0)
    np.savez(folder / "probe.npz", inputs=inputs, outputs=outputs)
    (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
    return {
        "model.keras": folder / "model.keras",
        "probe.npz": folder / "probe.npz",
        "metrics.json": folder / "metrics.json",
    }


def manifest(
    accuracy: float, test_fingerprint: str = "testset-A", floor: float | None = None, classes=("a", "b", "c")
) -> dict:
    return {
        "architecture": "tiny",
        "parameter_count": 147,
        "config": {"epochs": 1},
        "metrics": {"test_accuracy": accuracy, "test_loss": 1.0, "per_class": [], "train_seconds": 1.0,
                    "promotion_floor": floor},
        "dataset": {"source": "synthetic", "fingerprint": "data-1", "test_fingerprint": test_fingerprint,
                    "train_count": 1, "validation_count": 1, "test_count": 1, "class_names": list(classes)},
        "code": {"git_commit": None, "dirty": None},
        "libraries": {"python": "3"},
        "flow_run_id": None,
    }  # fmt: skip


@pytest.fixture
def files(tmp_path):
    return make_model_files(tmp_path / "run")


def test_first_version_is_champion_with_a_complete_manifest(artifacts, files):
    registration = Registry(artifacts).register(files, manifest(0.5))
    assert (registration.version, registration.champion) == (1, True) and "first version" in registration.reason
    version_dir = artifacts / "models" / "cifar10" / "v1"
    saved = read_json(version_dir / "manifest.json")
    assert MANIFEST_KEYS <= set(saved) and saved["version"] == 1 and saved["created_at"].endswith("+00:00")
    assert set(saved["files"]) == {"model.keras", "probe.npz", "metrics.json"}
    assert all(sha256_file(version_dir / name) == digest for name, digest in saved["files"].items())
    state = read_json(artifacts / "models" / "cifar10" / "registry.json")
    assert state["aliases"] == {"latest": 1, "champion": 1}
    assert [(m["alias"], m["to"]) for m in state["history"]] == [("latest", 1), ("champion", 1)]


@pytest.mark.parametrize(
    ("accuracy", "margin", "promoted", "why"),
    [(0.6, 0.0, True, ">="), (0.5, 0.0, True, ">="), (0.4, 0.0, False, "<"), (0.55, 0.1, False, "< champion")],
)
def test_gate_compares_with_the_champion(artifacts, files, accuracy, margin, promoted, why):
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    registration = registry.register(files, manifest(accuracy), margin=margin)
    assert registration.champion is promoted and why in registration.reason
    state = registry.state()
    assert state["aliases"] == {"latest": 2, "champion": 2 if promoted else 1}
    if not promoted:
        assert "v2 stays challenger" in state["history"][-1]["why"]


def test_gate_compares_across_test_sets_only_with_the_champions_recorded_score(artifacts, files):
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    registration = registry.register(files, manifest(0.99, test_fingerprint="testset-B"))
    assert not registration.champion and "not scored on this test set (testset-B)" in registration.reason
    registry.record_score(1, "testset-B", {"accuracy": 0.7, "loss": 0.9, "count": 100})
    refused = registry.register(files, manifest(0.65, test_fingerprint="testset-B"))
    promoted = registry.register(files, manifest(0.72, test_fingerprint="testset-B"))
    assert not refused.champion and "0.6500 < champion v1's 0.7000 + 0.0 on test set testset-B" in refused.reason
    assert promoted.champion and ">= champion v1's 0.7000" in promoted.reason
    state = registry.state()
    assert state["versions"][0]["scores"]["testset-B"]["accuracy"] == 0.7
    assert state["aliases"]["champion"] == 4 and "on test set testset-B" in state["history"][-1]["why"]


@pytest.mark.parametrize("classes", [("a", "b", "c", "d"), ("a", "b")])
def test_gate_never_compares_a_champion_with_other_classes(artifacts, files, classes):
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    registration = registry.register(files, manifest(0.99, classes=classes))
    assert not registration.champion and "classes differ from champion v1's" in registration.reason
    assert ("added d" if len(classes) == 4 else "removed c") in registration.reason


def test_no_version_below_the_promotion_floor_becomes_champion_not_even_the_first(artifacts, files):
    registry = Registry(artifacts)
    first = registry.register(files, manifest(0.12, floor=0.15))
    assert not first.champion and "not above the promotion floor 0.1500" in first.reason
    assert registry.state()["aliases"] == {"latest": 1, "champion": None}
    second = registry.register(files, manifest(0.40, floor=0.15))
    assert second.champion and "no champion yet, above the promotion floor 0.1500" in second.reason


def test_gate_requires_the_reloaded_model_to_reproduce_the_trained_outputs(artifacts, tmp_path):
    registration = Registry(artifacts).register(make_model_files(tmp_path / "bad", wrong_probe=True), manifest(0.9))
    assert not registration.champion and "outputs differ" in registration.reason
    assert Registry(artifacts).state()["aliases"] == {"latest": 1, "champion": None}


def test_tampered_file_is_refused_with_its_name(artifacts, files):
    Registry(artifacts).register(files, manifest(0.5))
    version_dir = parse_reference("cifar10@v1", artifacts)
    assert verify_version(version_dir) == [] and load_verified_model(version_dir) is not None
    with open(version_dir / "model.keras", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ChecksumError, match=r"model\.keras: checksum differs"):
        load_verified_model(version_dir)
    (version_dir / "metrics.json").unlink()
    assert any("metrics.json: missing" in problem for problem in verify_version(version_dir))
    # Checking named files only (an export about to load): the others' problems are not theirs.
    assert [p.split("/")[-1] for p in verify_version(version_dir, ("metrics.json",))] == ["metrics.json: missing"]
    assert verify_version(version_dir, ("probe.npz",)) == []
    assert verify_version(version_dir, ("model.tflite",))[0].endswith(
        "model.tflite: not listed in the version's manifest"
    )


def test_references_resolve(artifacts, files):
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    registry.register(files, manifest(0.4))
    models = artifacts / "models" / "cifar10"
    assert parse_reference("cifar10", artifacts) == models / "v1"
    assert parse_reference("cifar10@champion", artifacts) == models / "v1"
    assert parse_reference("cifar10@latest", artifacts) == models / "v2"
    assert parse_reference("cifar10@v2", artifacts) == models / "v2"
    assert parse_reference(str(models / "v2"), artifacts) == models / "v2"
    for bad, message in [("cifar10@v9", "no such version"), ("cifar10@best", "unknown tag"), ("other", "no version")]:
        with pytest.raises(RegistryError, match=message):
            parse_reference(bad, artifacts)


def test_promote_and_rollback_are_recorded(artifacts, files):
    registry = Registry(artifacts)
    for accuracy in (0.5, 0.6, 0.7):
        registry.register(files, manifest(accuracy))
    assert registry.state()["aliases"]["champion"] == 3
    assert registry.rollback("v3 misbehaves in production") == 2
    assert registry.rollback("v2 too") == 1
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback("again")
    assert registry.promote("v3", reason="fixed upstream") == 3
    history = registry.state()["history"]
    assert history[-1] == {**history[-1], "alias": "champion", "from": 1, "to": 3, "why": "fixed upstream"}
    assert any(m["action"] == "rollback" and m["why"] == "v3 misbehaves in production" for m in history)
    assert champion_stack(history) == [1, 3]


def test_a_named_alias_points_where_it_is_told_and_resolves_like_champion(artifacts, files):
    from model_lib.config import ConfigError

    registry = Registry(artifacts)
    for accuracy in (0.5, 0.6):
        registry.register(files, manifest(accuracy))
    assert registry.set_alias("edge", "v1", reason="pruned from v2") == 1
    assert parse_reference("cifar10@edge", artifacts) == artifacts / "models" / "cifar10" / "v1"
    state = registry.state()
    assert state["aliases"] == {"latest": 2, "champion": 2, "edge": 1}  # champion did not move
    assert state["history"][-1] == {**state["history"][-1], "alias": "edge", "to": 1, "action": "alias"}
    for name in ("champion", "latest", "v3", "Edge", "edge/x", ""):
        with pytest.raises(ConfigError, match="an alias is a lower-case name"):
            registry.set_alias(name, "v2", reason="try")
    (artifacts / "models" / "cifar10" / "v2" / "probe.npz").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="v2 refused"):
        registry.set_alias("edge", "v2", reason="try")
    assert Registry(artifacts).state()["aliases"]["edge"] == 1


def test_a_tampered_version_never_becomes_champion(artifacts, files):
    registry = Registry(artifacts)
    for accuracy in (0.5, 0.6):
        registry.register(files, manifest(accuracy))
    (artifacts / "models" / "cifar10" / "v1" / "probe.npz").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match=r"v1 refused: .*probe\.npz: checksum differs"):
        registry.promote("v1", reason="looks better")
    with pytest.raises(ChecksumError, match=r"v1 refused"):
        registry.rollback("v2 misbehaves")
    with pytest.raises(RegistryError, match="--reason must say why"):
        registry.promote("v2", reason="  ")
    state = registry.state()
    assert state["aliases"]["champion"] == 2 and [m["action"] for m in state["history"]].count("promote") == 0


@pytest.mark.parametrize(
    "content",
    ['{"versions": [', "[]", '{"versions": []}', "\xff\xfe",
     '{"versions": {"1": 5}, "aliases": {"latest": 1, "champion": 1}, "history": []}',  # right keys, wrong types
     '{"versions": [{"version": 1}], "aliases": {"latest": 1, "champion": 9}, "history": []}',  # alias to nothing
     '{"versions": [{"version": "1"}], "aliases": {"latest": null, "champion": null}, "history": []}',
     '{"versions": [], "aliases": {"latest": null, "champion": null}, "history": [5]}'],
)  # fmt: skip
def test_a_corrupt_registry_file_is_named_with_what_to_do(artifacts, files, content):
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    (registry.root / "registry.json").write_bytes(content.encode("latin-1"))
    for attempt in (registry.state, lambda: registry.resolve("v1"), lambda: registry.register(files, manifest(0.6))):
        with pytest.raises(RegistryError, match=r"registry\.json: corrupt registry .* restore the file from a backup"):
            attempt()
    assert sorted(p.name for p in registry.root.iterdir() if not p.name.startswith(".")) == ["registry.json", "v1"]


def test_an_unknown_model_name_leaves_no_folder_behind(artifacts):
    for attempt in (lambda r: r.promote("v1", "why"), lambda r: r.rollback("why"), lambda r: r.resolve("v1")):
        with pytest.raises(RegistryError, match="no such"):
            attempt(Registry(artifacts, "nosuch"))
    assert not (artifacts / "models" / "nosuch").exists()


def test_a_killed_writers_staging_folder_is_removed_by_the_next_registration(artifacts, files):
    import socket
    import subprocess
    import sys

    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = registry.root / f".staging-0123abcd0123-{ended.stdout.strip()}@{socket.gethostname()}"
    left.mkdir()
    (left / "model.keras").write_bytes(b"half copied")
    registry.register(files, manifest(0.6))
    assert not left.exists() and not list(registry.root.glob(".staging-*"))


@pytest.mark.parametrize("step", ["copied", "checked", "manifest_written", "renamed", "state_written"])
def test_crash_between_steps_leaves_nothing_half_written(artifacts, files, monkeypatch, step):
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))

    def crash(at):
        if at == step:
            raise KeyboardInterrupt(f"killed at {at}")

    monkeypatch.setattr(registry_module, "_crash_point", crash)
    with pytest.raises(KeyboardInterrupt):
        registry.register(files, manifest(0.9))
    monkeypatch.undo()

    root = artifacts / "models" / "cifar10"
    assert not list(root.glob(".staging-*"))
    for version_dir in root.glob("v*"):  # every visible version is complete and intact
        assert verify_version(version_dir) == []
    state = read_json(root / "registry.json")  # still valid JSON
    assert state["aliases"]["champion"] in (1, 2)
    after = registry.register(files, manifest(0.95))
    listed = [entry["version"] for entry in registry.state()["versions"]]
    assert after.version == listed[-1] and len(listed) == len(set(listed))
    if step in ("renamed", "state_written"):  # the version landed before the crash: never lost, never reused
        assert 2 in listed and after.version == 3


def unchecked_load(version_dir: Path) -> tuple[bool, str]:
    """The gate's load-back check, passed, for writers that race each other: what they test is the claims and the
    aliases, and loading the model would import TensorFlow in each process (4 s of CPU apiece)."""
    return True, "load-back not checked in this concurrency test"


def _register_in_process(artifacts: str, files: dict, accuracy: float, queue) -> None:
    registration = Registry(artifacts).register(files, manifest(accuracy), load_check=unchecked_load)
    queue.put(registration.version)


def run_at_once(target, argument_lists: list[tuple], timeout: float = 300) -> list:
    """Start one spawned process per argument list at once (each gets a result queue last); their results."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=target, args=(*arguments, queue)) for arguments in argument_lists]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=timeout)
    assert [worker.exitcode for worker in workers] == [0] * len(workers)
    return [queue.get(timeout=5) for _ in workers]


@pytest.mark.slow
def test_eight_processes_registering_at_once_all_succeed(artifacts, files):
    versions = sorted(run_at_once(_register_in_process, [(str(artifacts), files, 0.5 + i / 100) for i in range(8)]))
    assert versions == list(range(1, 9))
    state = Registry(artifacts).state()
    assert [entry["version"] for entry in state["versions"]] == versions and state["aliases"]["latest"] == 8
    for version in versions:
        assert verify_version(artifacts / "models" / "cifar10" / f"v{version}") == []


def test_a_staging_folder_renamed_away_while_stale_ones_are_looked_for_is_skipped(artifacts, files, monkeypatch):
    """Another writer's staging folder may be listed, then renamed into place before its age is read: eight
    processes registering at once once failed one registration on it (FileNotFoundError)."""
    registry = Registry(artifacts)
    registry.root.mkdir(parents=True)
    gone = registry.root / f"{registry_module.STAGING_PREFIX}renamed-away"  # listed, never there
    listing = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [gone, *listing(self, pattern)])
    assert registry.register(files, manifest(0.5), load_check=unchecked_load).version == 1


@pytest.mark.parametrize("ref", ["", "cifar10@", "@champion", "@"])
def test_an_empty_or_half_written_model_reference_is_a_usage_error(artifacts, files, ref):
    from model_lib.config import ConfigError

    Registry(artifacts).register(files, manifest(0.5))
    with pytest.raises(ConfigError, match="is incomplete: use name, name@champion"):
        parse_reference(ref, artifacts)


def test_a_version_folder_without_its_manifest_is_named(artifacts, files):
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    (registry.root / "v1" / "manifest.json").unlink()
    with pytest.raises(RegistryError, match=r"v1/manifest\.json: missing; the version folder is incomplete"):
        parse_reference("cifar10@v1", artifacts)


def test_asking_for_a_model_name_with_no_versions_names_the_ones_registered(artifacts, files):
    with pytest.raises(RegistryError, match=r"^cifar10@champion: no version is champion yet; train one first$"):
        Registry(artifacts).resolve("champion")
    Registry(artifacts, "digits").register(files, manifest(0.9))
    with pytest.raises(RegistryError) as raised:
        Registry(artifacts).resolve("champion")
    assert str(raised.value) == (
        "cifar10@champion: no version is champion yet; registered here: digits (name one, e.g. digits@champion)"
    )
