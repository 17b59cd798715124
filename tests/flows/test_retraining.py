"""Retraining as data grows, on real CIFAR-10 slices: the champion is re-scored on the new test set,
the gate compares both on the same images, and the data gates stop a leaky run before training."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.train_cifar import train_cifar
from model_lib.data_report import DataGateError
from model_lib.evaluate import score_model
from model_lib.fileio import read_json
from model_lib.registry import Registry
from model_lib.versions import load_verified_model

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def grow(root: Path, cifar_dir: Path, train_per_class: int, test_per_class: int) -> None:
    """Copy the first N images per class of the real data into `root` (files already there stay)."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted((cifar_dir / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(class_dir.iterdir())[:count]:
                if not (target / path.name).exists():
                    shutil.copyfile(path, target / path.name)


# What is checked is the gate's arithmetic on re-scored test sets, not how well a model learns: smoke's recipe
# at quarter width (a sixteenth of the multiply-adds) still tells four epochs on 800 images from one on 400.
SMALL = dict(profile="smoke", network_width=0.25)


def test_retrain_on_grown_data_rescores_the_champion_promotes_better_and_refuses_worse(
    prefect_harness, cifar_dir, tmp_path, artifacts
):
    data = tmp_path / "cifar"
    grow(data, cifar_dir, 50, 20)  # data A: 500 train, 200 test
    # One epoch on 400 images is barely above chance: a weak first champion (the margin lets it register).
    first = train_cifar(**SMALL, data=str(data), epochs=1, learned_margin=-1.0)
    assert first["champion"] and first["version"] == 1

    grow(data, cifar_dir, 100, 30)  # data B: 1,000 train, 300 test (A's files plus new ones)
    better = train_cifar(**SMALL, data=str(data), epochs=4)
    registry = Registry(artifacts, "cifar10")
    state = registry.state()
    b_test = read_json(Path(better["path"]) / "manifest.json")["dataset"]["test_fingerprint"]
    v1_on_b = state["versions"][0]["scores"][b_test]["accuracy"]
    # The recorded score is v1 really scored on B's 300 test images.
    cache = read_json(Path(better["path"]) / "manifest.json")["dataset"]["source"]
    assert cache.endswith(str(data))
    cache_dir = next(
        p for p in (artifacts / "datasets").iterdir() if read_json(p / "dataset.json")["test_count"] == 300
    )
    rescored, _ = score_model(load_verified_model(registry.version_dir(1)), str(cache_dir), first_classes(registry))
    assert rescored["test_count"] == 300 and rescored["test_accuracy"] == pytest.approx(v1_on_b)
    assert better["champion"], better["reason"]
    assert f"champion v1's {v1_on_b:.4f} + 0.0 on test set {b_test[:12]} (300 images)" in better["reason"]
    assert state["history"][-1]["why"] == better["reason"] and state["aliases"]["champion"] == 2

    # The trigger's duplicate (same data and config as v2) ends without training or registering.
    again = train_cifar(**SMALL, data=str(data), epochs=4, skip_unchanged=True, return_state=True)
    assert again.is_completed() and again.message == "skipped: cifar10 v2 was trained on this config and data"
    assert again.result() == {"name": "cifar10", "skipped": "v2 was trained on this config and data"}
    assert len(registry.state()["versions"]) == 2

    report = read_json(Path(better["path"]) / "data_report.json")
    assert report["previous"]["version"] == 1
    assert (report["previous"]["files_added"], report["previous"]["files_removed"]) == (600, 0)
    assert report["previous"]["class_changes"]["cat"] == {"train": 50, "test": 10}

    leaked = sorted((data / "test" / "cat").iterdir())[:3]
    for path in leaked:
        shutil.copyfile(path, data / "train" / "cat" / f"copy_{path.name}")
    runs_before = set((artifacts / "runs").glob("[!.]*"))
    with pytest.raises(
        DataGateError, match=rf"test leakage: 3 test image\(s\).*test/cat/{leaked[0].name} = train/cat/"
    ):
        train_cifar(**SMALL, data=str(data), epochs=1)
    (new_run,) = set((artifacts / "runs").glob("[!.]*")) - runs_before
    assert not (new_run / "history.csv").exists()  # stopped before training
    assert len(registry.state()["versions"]) == 2

    # Relaxed, the same data trains; one epoch is worse than the champion on the same test set: refused.
    worse = train_cifar(**SMALL, data=str(data), epochs=1, learned_margin=-1.0, max_leakage=0.02)
    assert not worse["champion"]
    assert f"< champion v2's {better['test_accuracy']:.4f} + 0.0 on test set {b_test[:12]}" in worse["reason"]
    state = registry.state()
    assert state["aliases"]["champion"] == 2 and state["history"][-1]["action"] == "gate_refused"
    assert "scores" not in state["versions"][1]  # v2 was scored on this test set by its own run: not again
    assert np.isclose(state["versions"][0]["scores"][b_test]["accuracy"], v1_on_b)
    assert read_json(Path(worse["path"]) / "data_report.json")["duplicates"]["train_test"] == 3


def first_classes(registry: Registry) -> list[str]:
    return registry.state()["versions"][0]["class_names"]
