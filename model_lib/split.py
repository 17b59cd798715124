"""The stratified validation split: which cached training images train and which validate a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_lib.config import MAX_VALIDATION_SHARE, MIN_VALIDATION_IMAGES
from model_lib.fileio import atomic_open


@dataclass(frozen=True)
class Split:
    """Indices into the cached training arrays: who trains, who validates."""

    train_index: np.ndarray
    val_index: np.ndarray


def stratified_split(labels: np.ndarray, fraction: float, seed: int, min_held_out: int = 0) -> Split:
    """Hold out `fraction` of each class for validation, chosen by a seeded shuffle.

    With `min_held_out` (and a `fraction` above 0), each class holds out at least its share of
    `min_held_out` images, but never more than `MAX_VALIDATION_SHARE` of itself: a folder of a
    thousand images at 2% would otherwise hold out 20, too few to calibrate confidence on.

    Raises:
        ValueError: `fraction` outside [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation split must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    floor = -(-min_held_out // max(len(classes), 1)) if fraction > 0 else 0  # per class, rounded up
    train, val = [], []
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out = max(int(round(len(members) * fraction)), min(floor, int(len(members) * MAX_VALIDATION_SHARE)))
        val.append(members[:held_out])
        train.append(members[held_out:])
    return Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))


def save_split(split: Split, path: Path) -> None:
    """Save a split as an `.npz` of plain integer arrays (loaded back without pickle)."""
    with atomic_open(path, "wb") as handle:
        np.savez(handle, train_index=split.train_index, val_index=split.val_index)


def load_split(path: Path) -> Split:
    with np.load(path, allow_pickle=False) as data:
        return Split(data["train_index"], data["val_index"])


def run_split(labels: np.ndarray, fraction: float, seed: int) -> Split:
    """A training run's split: `stratified_split` holding out at least `MIN_VALIDATION_IMAGES` where it can. A function
    of the labels and the config's `validation_split` and `seed` alone, so a version's split can be made again
    from its manifest (`model_lib.export` fits each export's feature rule on it)."""
    return stratified_split(labels, fraction, seed, MIN_VALIDATION_IMAGES)
