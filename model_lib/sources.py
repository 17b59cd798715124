"""Where a dataset comes from, read into memory or listed: an image folder `ROOT/{train,test}/<class>/*` (on
disk, or in an object store through a local copy), the original `cifar-10-batches-py` folder (read with an
unpickler that builds only plain containers and numpy arrays), or Keras' download; and the image side
`auto` picks. model_lib/data.py decodes and caches what these name."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_lib.config import AUTO, AUTO_IMAGE_SIZES, option
from model_lib.images import ENTRY_ERRORS, header_size, walk_folder
from model_lib.settings import DEFAULT_MODEL_NAME, KERAS_DOWNLOAD, is_url, work_dir
from model_lib.stores import open_store

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
COPIES = "copies"  # under the local cache: local copies of image folders kept in object stores
AUTO_SAMPLE_FILES = 200  # training images, spread over the classes, whose headers `auto` reads for their size
ARRAY_SIDE = 32  # pixels per side of CIFAR-10's batches and Keras' download


class DatasetError(ValueError):
    """The data source is missing, malformed, or holds files that cannot be decoded."""


@dataclass(frozen=True)
class Arrays:
    """The decoded dataset: images as (n, h, w, 3) uint8, labels as (n,) int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def resolve_source(data: str) -> tuple[str, Path | None]:
    """Classify a `data` value as `keras`, `image_folder` or `cifar_batches`.

    Raises:
        DatasetError: The path does not exist or has neither layout.
    """
    if data == KERAS_DOWNLOAD:
        return "keras", None
    if is_url(data):
        if not open_store(data).list("train"):
            raise DatasetError(f"{data}: not a dataset: expected train/<class>/ image folders under it")
        return "image_folder", None
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found (set CIFAR10_DIR or pass {option('data')})")
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return "cifar_batches", candidate
    if (root / "train").is_dir():
        return "image_folder", root
    raise DatasetError(f"{root}: not a dataset: expected train/<class>/ image folders or a cifar-10-batches-py folder")


def auto_image_size(short_sides: Sequence[int]) -> int:
    """The side `auto` picks for images with these short sides: the largest of `AUTO_IMAGE_SIZES` at most
    their median, so images are not blown up past their own detail (CIFAR-10: 32; 500x375 photos: 128)."""
    median = float(np.median(short_sides))
    return max([AUTO_IMAGE_SIZES[0]] + [side for side in AUTO_IMAGE_SIZES if side <= median])


def chosen_size(image_size: int | str, train_files: Sequence[Path]) -> tuple[int, str]:
    """`(side, how it was chosen)`: as asked, or for `auto` from the headers of a sample of the training files
    spread over the classes (the listing holds each class's files together)."""
    if image_size != AUTO:
        return int(image_size), "asked for"
    sample = [train_files[i] for i in spread_over(np.arange(len(train_files)), AUTO_SAMPLE_FILES)]
    sides = [min(size) for size in map(header_size, sample) if size]
    if not sides:  # none readable: decoding will name the broken files
        return AUTO_IMAGE_SIZES[0], "auto: no readable image header among the sampled files"
    side = auto_image_size(sides)
    return side, (
        f"auto: the median short side of {len(sides)} sampled training images is {np.median(sides):g} px; auto picks "
        f"the largest of {', '.join(map(str, AUTO_IMAGE_SIZES))} px not above it ({option('image_size')} N for another)"
    )


def local_copy(url: str, log: Callable[[str], None] = print) -> Path:
    """This machine's copy of an image folder in an object store, brought up to date (changed files only)."""
    target = work_dir() / COPIES / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    fetched = open_store(url).sync_to(target)
    log(f"{url}: local copy in {target} is up to date ({fetched} file(s) fetched)")
    return target


def suggested_model_name(source: str, class_names: Sequence[str]) -> str:
    """The registry name for a model of this data: `cifar10` for CIFAR-10's classes, else the folder's name.

    So one registry holds several datasets' models without mixing them; `--name` overrides it.
    """
    if tuple(class_names) == CIFAR10_CLASSES:
        return DEFAULT_MODEL_NAME
    folder = Path(source.partition(":")[2]).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", folder).strip("-_.") or "model"


def spread_over(index: np.ndarray, count: int) -> np.ndarray:
    """At most `count` entries of `index` spaced evenly over all of it: the cache stores each class's images
    together, so a sample taken from the front would be one or two classes."""
    positions = np.unique(np.linspace(0, len(index) - 1, min(len(index), count)).astype(int))
    return np.asarray(index)[positions]


def list_image_folder(
    root: Path, max_train: int | None, max_test: int | None
) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    train_root = root / "train"
    _refuse_outside_link(root, train_root)
    class_names = sorted(p.name for p in train_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_names) < 2:
        found = f"only {class_names[0]!r}" if class_names else "none"
        raise DatasetError(f"{train_root}: a classifier needs at least 2 class folders, found {found}")
    splits: dict[str, list[tuple[Path, int]]] = {}
    for split, limit in (("train", max_train), ("test", max_test)):
        split_root = root / split
        _refuse_outside_link(root, split_root)
        if not split_root.is_dir():
            raise DatasetError(f"{split_root}: missing (expected {split}/<class>/ folders)")
        unknown = sorted(
            p.name for p in split_root.iterdir() if p.is_dir() and p.name not in class_names and p.name[0] != "."
        )
        if unknown:
            raise DatasetError(f"{split_root}: classes not in train/: {', '.join(unknown)}")
        per_class = []
        for label, name in enumerate(class_names):
            class_root = split_root / name
            _refuse_outside_link(root, class_root)
            entries = list(walk_folder(class_root)) if class_root.is_dir() else []
            outside = [e.relative_path for e in entries if e.kind == "outside_link"]
            if outside:
                raise DatasetError(f"{class_root / outside[0]}: link points outside the data folder")
            # Training without some of its images would be training on other data than asked for.
            broken = [e for e in entries if e.kind in ENTRY_ERRORS]
            if broken:
                raise DatasetError(f"{class_root / broken[0].relative_path}: {ENTRY_ERRORS[broken[0].kind]}")
            per_class.append([(class_root / e.relative_path, label) for e in entries if e.kind == "image"])
        empty = [name for name, items in zip(class_names, per_class, strict=True) if not items]
        if empty:  # untrainable, or an accuracy that says nothing about the class
            raise DatasetError(f"{split_root}: no images for class(es) {', '.join(empty)}; every class needs some")
        if limit is not None and limit < len(class_names):
            raise DatasetError(
                f"{option(f'max_{split}_images')} {limit} leaves some of the {len(class_names)} classes empty"
            )
        splits[split] = _take_balanced(per_class, limit)
    return class_names, splits


def _refuse_outside_link(root: Path, path: Path) -> None:
    """A split or class folder that is a link must stay inside the data folder, like a file link."""
    if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root):
        raise DatasetError(f"{path}: link points outside the data folder")


def _take_balanced(per_class: list[list], limit: int | None) -> list:
    """Round-robin over classes so a capped subset stays class-balanced and deterministic."""
    chosen, depth = [], 0
    total = sum(len(items) for items in per_class)
    limit = total if limit is None else min(limit, total)
    while len(chosen) < limit:
        for items in per_class:
            if depth < len(items) and len(chosen) < limit:
                chosen.append(items[depth])
        depth += 1
    return sorted(chosen, key=lambda item: (item[1], str(item[0])))


def balanced_subset(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(y):
        return x, y
    per_class = [list(np.flatnonzero(y == label)) for label in np.unique(y)]
    index = np.sort(np.array([i for i, _ in _take_balanced([[(i, 0) for i in c] for c in per_class], limit)]))
    return x[index], y[index]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds only the plain containers and numpy arrays a CIFAR batch holds; refuses any other class."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _unpickle_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _ArrayOnlyUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DatasetError(f"{path}: not a valid CIFAR batch file ({error})") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}


def read_cifar_batches(root: Path) -> tuple[Arrays, list[str]]:
    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            path = root / name
            if not path.is_file():
                raise DatasetError(f"{path}: missing CIFAR batch file")
            batch = _unpickle_batch(path)
            xs.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, ARRAY_SIDE, ARRAY_SIDE).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch["labels"], np.int32))
        return np.concatenate(xs), np.concatenate(ys)

    class_names = list(CIFAR10_CLASSES)
    if (root / "batches.meta").is_file():
        meta = _unpickle_batch(root / "batches.meta")
        class_names = [n.decode() if isinstance(n, bytes) else n for n in meta["label_names"]]
    return Arrays(*read([f"data_batch_{i}" for i in range(1, 6)]), *read(["test_batch"])), class_names


def download_keras_cifar10() -> tuple[Arrays, list[str]]:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # urllib raises a zoo of types when offline
        raise DatasetError(
            f"Keras' CIFAR-10 download failed ({error}); offline, point CIFAR10_DIR or {option('data')} at a local copy"
        ) from None
    labels = (y.reshape(-1).astype(np.int32) for y in (y_train, y_test))
    y_train, y_test = labels
    return Arrays(x_train, y_train, x_test, y_test), list(CIFAR10_CLASSES)
