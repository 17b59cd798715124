"""Run folders: the same config on the same data maps to one folder, so a crashed run resumes there.

A second identical run started while the first is alive must not share it (their histories and
checkpoints would mix), so each run claims its folder with an owner file naming its host and
process. A folder whose owner is dead is taken over (that is the resume); one whose owner lives
is left alone and the newcomer gets a fresh sibling. `TrainResult` says what a finished run left
in its folder.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from model_lib.fileio import process_gone, process_tag

MODEL_FILE = "model.keras"  # the trained Keras model, registered with the version
PROBE_FILE = "probe.npz"  # a few inputs and the trained model's outputs on them: the gate's reload check
CONFIG_FILE = "config.json"  # the run's TrainConfig
HISTORY_FILE = "history.csv"  # one row per epoch (Keras' CSVLogger), the curves' source
METRICS_FILE = "metrics.json"  # test metrics, the confusion matrix among them
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.csv"
PRUNING_FILE = "pruning.json"  # a pruned version's speed and size beside its parent's, measured side by side
PLOT_FILES = {"curves": "curves.png", "confusion": "confusion_matrix.png", "reliability": "reliability.png",
              "samples": "samples.png", "pruning": "pruning.png"}  # fmt: skip
OWNER_FILE = ".owner"  # the `process_tag` of the run using the folder
TEST_PROBABILITIES = "test_probabilities.npy"  # the saved model's outputs on the test set, in the run folder
UNCALIBRATED_PROBABILITIES = "test_probabilities_uncalibrated.npy"  # beside the calibrated ones, for the plots
SPLIT_FILE = "split.npz"  # the run's train/validation split (model_lib.preprocess)
# What a finished run keeps in its folder for itself and does not register. Every other file there is one of the
# version's artefacts (tasks/training.py's RUN_FILES); the flow's test checks that none is left behind.
RUN_WORK_FILES = frozenset({OWNER_FILE, SPLIT_FILE, TEST_PROBABILITIES, UNCALIBRATED_PROBABILITIES})


def claim_run_dir(runs_root: Path, key: str) -> Path:
    """This run's folder: `runs_root/key`, or a fresh `key-<id>` beside it while a live run holds that."""
    runs_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(runs_root / f".{key}.lock")):  # one claim at a time per key
        for folder in (runs_root / key, runs_root / f"{key}-{uuid.uuid4().hex[:8]}"):
            folder.mkdir(exist_ok=True)
            if not _held_by_another_live_run(folder / OWNER_FILE):
                (folder / OWNER_FILE).write_text(process_tag(), encoding="utf-8")
                return folder
    raise AssertionError("a fresh folder is never held")


def release_run_dir(folder: Path) -> None:
    """Give the folder up after a finished run, so the next identical run may use it."""
    owner = folder / OWNER_FILE
    if owner.is_file() and owner.read_text(encoding="utf-8") == process_tag():
        owner.unlink()


def _held_by_another_live_run(owner: Path) -> bool:
    try:
        tag = owner.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return False
    # This process's own tag: an earlier run of it that failed, so this is its resume. A run on
    # another machine sharing the folder cannot be checked: it is assumed alive.
    return tag != process_tag() and not process_gone(tag)


def read_history(path: Path):
    """A run's per-epoch history as a DataFrame; an epoch redone after a resume keeps its last row."""
    import pandas as pd

    history = pd.read_csv(path)
    return history.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


@dataclass(frozen=True)
class TrainResult:
    """Paths and figures a training run hands to evaluation and registration."""

    run_dir: str
    model_path: str
    probe_path: str
    history_path: str
    epochs_run: int
    train_seconds: float
    precision: str
    device: str
    backend: str  # Keras' backend that trained the model: tensorflow or jax
    device_count: int = 1  # devices the batches were split over (data parallel)
