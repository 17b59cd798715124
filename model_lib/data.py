"""Ingest: read a dataset once into uint8 arrays cached under `<cache>/datasets/<fingerprint>/` (`settings.work_dir`).

Three sources, chosen by `resolve_source`:
  * an image folder `ROOT/{train,test}/<class>/*` in any common format (class names = folder names),
    on disk or in an object store (`s3://bucket/prefix`, kept in sync in a local copy);
  * the original `cifar-10-batches-py` folder, read with an unpickler that only builds plain
    containers and numpy arrays (never arbitrary objects);
  * `keras`: Keras' CIFAR-10 download, the online default.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from model_lib.config import AUTO, AUTO_IMAGE_SIZES
from model_lib.fileio import open_store, read_json, write_json
from model_lib.images import ENTRY_ERRORS, decode_files_ahead, decoding_pool, header_size, resize_pixels, walk_folder
from model_lib.progress import Progress
from model_lib.settings import DEFAULT_MODEL_NAME, KERAS_DOWNLOAD, is_url, work_dir

CACHE_FORMAT = 3  # bump when the cached arrays' layout, the decoder's output or the fingerprint changes
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DECODE_CHUNK_FILES = 512  # files per worker task: large enough to amortise process IPC
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
FILE_TABLE = "files.csv"  # one row per cached image: split, path, class, original size and kind, pixel hash
KEYS = "dataset-keys"  # beside datasets/: <listing key>.json, what a folder listing (names, sizes, times) decoded to
COPIES = "copies"  # under the local cache: local copies of image folders kept in object stores
AUTO_SAMPLE_FILES = 200  # training images, spread over the classes, whose headers `auto` reads for their size
ARRAY_SIDE = 32  # pixels per side of CIFAR-10's batches and Keras' download
STAGING_PREFIX = ".tmp-"  # datasets/<this><id>/: a cache entry being assembled
STALE_STAGING_HOURS = 6  # an assembly untouched this long was left by a killed ingest (a live one writes on)


class DatasetError(ValueError):
    """The data source is missing, malformed, or holds files that cannot be decoded."""


@dataclass(frozen=True)
class DatasetInfo:
    """What ingest produced: small and JSON-friendly, so Prefect tasks can pass it around."""

    cache_dir: str
    fingerprint: str
    source: str
    class_names: list[str]
    train_count: int
    test_count: int
    image_shape: list[int]
    from_cache: bool = False
    skipped_files: list[str] = field(default_factory=list)
    size_reason: str = ""  # how the image side was chosen, in words, for the log and the version's report

    def to_dict(self) -> dict:
        return asdict(self)


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
        raise DatasetError(f"{root}: data folder not found (set CIFAR10_DIR or pass --data)")
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return "cifar_batches", candidate
    if (root / "train").is_dir():
        return "image_folder", root
    raise DatasetError(f"{root}: not a dataset: expected train/<class>/ image folders or a cifar-10-batches-py folder")


def ingest(
    data: str,
    artifacts_root: Path,
    image_size: int | str = AUTO,
    max_train_images: int | None = None,
    max_test_images: int | None = None,
    skip_corrupt: bool = False,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    check_size: Callable[[int, int, int], None] | None = None,
) -> DatasetInfo:
    """Decode a dataset once and cache it; later calls with the same content load the cache.

    Args:
        data: A folder path (image folder or cifar-10-batches-py) or `keras`.
        artifacts_root: The local cache (`settings.work_dir()`); the datasets live in its `datasets/` folder.
        image_size: Side in pixels that images are resized to, or `auto` (`auto_image_size`).
        max_train_images: Keep a class-balanced subset of at most this many training images.
        max_test_images: Likewise for the test split.
        skip_corrupt: Skip undecodable files (reported in `skipped_files`) instead of failing.
        workers: Decoding processes; default one per CPU core.
        log: Where progress lines go.
        check_size: Called with (side, training images, test images) once the side is known, before anything is
            decoded: it raises to refuse a size the run could not afford.

    Returns:
        The cache location and what it holds.

    Raises:
        DatasetError: Missing or malformed source, or undecodable files without `skip_corrupt`.
    """
    kind, root = resolve_source(data)
    datasets_dir = Path(artifacts_root) / "datasets"
    listing_key = None
    if kind == "image_folder":
        root = local_copy(data, log) if is_url(data) else root
        source = f"image_folder:{data if is_url(data) else root}"
        class_names, splits = _list_image_folder(root, max_train_images, max_test_images)
        image_size, size_reason = _chosen_size(image_size, [path for path, _ in splits["train"]])
        log(f"Image size {image_size} px: {size_reason}")
        if check_size:
            check_size(image_size, len(splits["train"]), len(splits["test"]))
        # What the listing says (names, sizes, times) finds the cache in a second; what it decodes to names it.
        listing_key = _fingerprint(
            {"kind": kind, "size": image_size, "classes": class_names},
            [(p.relative_to(root).as_posix(), *_stat_key(p)) for split in splits.values() for p, _ in split],
        )
        known = Path(artifacts_root) / KEYS / f"{listing_key}.json"
        cached = _load_info(datasets_dir / read_json(known)["fingerprint"]) if known.is_file() else None
        if cached:
            log(f"Dataset {cached.fingerprint[:12]} served from cache ({cached.train_count} train images)")
            return replace(cached, source=source, size_reason=size_reason)
        staging = _staging(datasets_dir)
        try:
            arrays, skipped, files = _decode_image_folder(
                root, splits, class_names, image_size, skip_corrupt, workers, log, staging
            )
        except BaseException:  # a bad file, Ctrl-C: no half-decoded dataset stays behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fingerprint = None  # from the decoded pixels, below
    else:
        if kind == "cifar_batches":
            arrays, class_names = _read_cifar_batches(root)
            source = f"cifar-10-batches-py:{root}"
        else:
            arrays, class_names = _download_keras_cifar10()
            source = KERAS_DOWNLOAD
        arrays = Arrays(
            *_balanced_subset(arrays.x_train, arrays.y_train, max_train_images),
            *_balanced_subset(arrays.x_test, arrays.y_test, max_test_images),
        )
        image_size, size_reason = (
            (ARRAY_SIDE, f"auto: CIFAR-10's images are {ARRAY_SIDE} px") if image_size == AUTO
            else (image_size, f"asked for (CIFAR-10's images are {ARRAY_SIDE} px)")
        )  # fmt: skip
        log(f"Image size {image_size} px: {size_reason}")
        if check_size:
            check_size(image_size, len(arrays.y_train), len(arrays.y_test))
        if image_size != ARRAY_SIDE:
            arrays = Arrays(resize_pixels(arrays.x_train, image_size), arrays.y_train,
                            resize_pixels(arrays.x_test, image_size), arrays.y_test)  # fmt: skip
        digest = hashlib.sha256()
        for name in ARRAY_NAMES:
            digest.update(np.ascontiguousarray(getattr(arrays, name)).data)
        fingerprint = _fingerprint({"kind": kind, "classes": class_names, "content": digest.hexdigest()}, [])
        cached = _load_info(datasets_dir / fingerprint)
        if cached:
            log(f"Dataset {fingerprint[:12]} served from cache")
            return replace(cached, size_reason=size_reason)
        skipped, staging = [], None
        files = [
            {"split": split, "path": f"{split}/{i}", "class": class_names[label], "width": ARRAY_SIDE,
             "height": ARRAY_SIDE, "kind": "array", "pixels": pixel_hash(image)}
            for split, labels, images in (("train", arrays.y_train, arrays.x_train),
                                          ("test", arrays.y_test, arrays.x_test))
            for i, (label, image) in enumerate(zip(labels, images, strict=True))
        ]  # fmt: skip
    if fingerprint is None:  # an image folder: the same files on any disk or store give the same fingerprint
        fingerprint = _fingerprint(
            {"kind": kind, "size": image_size, "classes": class_names},
            [(row["split"], row["path"], row["class"], row["pixels"]) for row in files],
        )
    info = DatasetInfo(
        cache_dir=str(datasets_dir / fingerprint),
        fingerprint=fingerprint,
        source=source,
        class_names=list(class_names),
        train_count=len(arrays.y_train),
        test_count=len(arrays.y_test),
        image_shape=list(arrays.x_train.shape[1:]),
        skipped_files=skipped,
        size_reason=size_reason,
    )
    _write_cache(Path(info.cache_dir), arrays, info, files, staging or _staging(datasets_dir))
    if listing_key is not None:
        write_json(Path(artifacts_root) / KEYS / f"{listing_key}.json", {"fingerprint": fingerprint})
    log(f"Dataset {fingerprint[:12]} cached: {info.train_count} train, {info.test_count} test images")
    return info


def auto_image_size(short_sides: Sequence[int]) -> int:
    """The side `auto` picks for images with these short sides: the largest of `AUTO_IMAGE_SIZES` at most
    their median, so images are not blown up past their own detail (CIFAR-10: 32; 500x375 photos: 128)."""
    median = float(np.median(short_sides))
    return max([AUTO_IMAGE_SIZES[0]] + [side for side in AUTO_IMAGE_SIZES if side <= median])


def _chosen_size(image_size: int | str, train_files: Sequence[Path]) -> tuple[int, str]:
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
        f"the largest of {', '.join(map(str, AUTO_IMAGE_SIZES))} px not above it (--image-size N for another)"
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


def pixel_hash(image: np.ndarray) -> str:
    """A 64-bit content hash of decoded pixels: equal images (exact duplicates) have equal hashes."""
    return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=8).hexdigest()


def load_file_table(cache_dir: str | os.PathLike):
    """The cached dataset's file table (a pandas DataFrame in the arrays' order: train rows, then test)."""
    return read_file_table(Path(cache_dir) / FILE_TABLE)


def read_file_table(path: str | os.PathLike):
    """A file table as ingest writes it, plain or gzipped (text columns stay text)."""
    import pandas as pd

    return pd.read_csv(
        path, dtype={"path": str, "class": str, "pixels": str}, keep_default_na=False,
        encoding="utf-8", encoding_errors="surrogateescape",  # non-UTF-8 file names survive the round trip
    )  # fmt: skip


def spread_over(index: np.ndarray, count: int) -> np.ndarray:
    """At most `count` entries of `index` spaced evenly over all of it: the cache stores each class's images
    together, so a sample taken from the front would be one or two classes."""
    positions = np.unique(np.linspace(0, len(index) - 1, min(len(index), count)).astype(int))
    return np.asarray(index)[positions]


def load_arrays(cache_dir: str | os.PathLike) -> Arrays:
    """Load a cached dataset (memory-mapped; `allow_pickle` stays off)."""
    cache_dir = Path(cache_dir)
    return Arrays(*(np.load(cache_dir / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES))


class PixelRows:
    """A cached image array's rows read with positional reads (`os.pread`), a batch at a time.

    Unlike a memory map, the rows read stay in the kernel's page cache, not in this process's memory: a pass
    over a dataset larger than memory leaves the process's size where it was. Reads from several threads at
    once are safe (no shared file position).
    """

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran_order or dtype.hasobject:
            raise DatasetError(f"{path}: not a cached image array")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.descriptor = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows))
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        if not len(rows):
            return out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for i, row in enumerate(rows.tolist()):
            flat[i] = np.frombuffer(
                os.pread(self.descriptor, self.row_bytes, self.offset + row * self.row_bytes), np.uint8
            )
        return out

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.close(self.descriptor)


def train_rows(cache_dir: str | os.PathLike) -> PixelRows:
    """A cached dataset's training images as `PixelRows`: what training reads its batches from."""
    return PixelRows(Path(cache_dir) / "x_train.npy")


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _fingerprint(header: dict, files: Sequence[tuple]) -> str:
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **header}, sort_keys=True).encode())
    for row in files:
        digest.update(("\0".join(map(str, row)) + "\n").encode("utf-8", "surrogateescape"))  # non-UTF-8 names too
    return digest.hexdigest()[:32]


def _load_info(cache_dir: Path) -> DatasetInfo | None:
    meta = cache_dir / "dataset.json"
    if not meta.is_file():
        return None
    with open(meta, encoding="utf-8") as handle:
        return DatasetInfo(**{**json.load(handle), "cache_dir": str(cache_dir), "from_cache": True})


def _staging(datasets_dir: Path) -> Path:
    """A hidden folder beside the datasets where a cache entry is assembled before its rename. Ones a killed
    ingest left behind (untouched for `STALE_STAGING_HOURS`) are removed first."""
    datasets_dir.mkdir(parents=True, exist_ok=True)
    for old in datasets_dir.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            touched = max(path.stat().st_mtime for path in [old, *old.iterdir()])  # files it is writing count
            if time.time() - touched > STALE_STAGING_HOURS * 3600:
                shutil.rmtree(old, ignore_errors=True)
    staging = datasets_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    return staging


def _write_cache(cache_dir: Path, arrays: Arrays, info: DatasetInfo, files: list[dict], staging: Path) -> None:
    """Complete the entry assembled in `staging` (the arrays not written there yet, the file table, the info)
    and rename it into place: a reader never sees a half-written cache."""
    import pandas as pd

    try:
        for name in ARRAY_NAMES:
            if not (staging / f"{name}.npy").is_file():
                np.save(staging / f"{name}.npy", getattr(arrays, name), allow_pickle=False)
        pd.DataFrame(files, columns=["split", "path", "class", "width", "height", "kind", "pixels"]).to_csv(
            staging / FILE_TABLE, index=False, encoding="utf-8", errors="surrogateescape"
        )
        write_json(staging / "dataset.json", info.to_dict())
        try:
            os.rename(staging, cache_dir)
        except OSError:
            if not (cache_dir / "dataset.json").is_file():  # not a concurrent twin: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _list_image_folder(
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
            raise DatasetError(f"--max-{split}-images {limit} leaves some of the {len(class_names)} classes empty")
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


def _balanced_subset(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(y):
        return x, y
    per_class = [list(np.flatnonzero(y == label)) for label in np.unique(y)]
    index = np.sort(np.array([i for i, _ in _take_balanced([[(i, 0) for i in c] for c in per_class], limit)]))
    return x[index], y[index]


def _decode_image_folder(
    root: Path,
    splits: dict[str, list[tuple[Path, int]]],
    class_names: list[str],
    size: int,
    skip_corrupt: bool,
    workers: int | None,
    log: Callable[[str], None],
    staging: Path,
) -> tuple[Arrays, list[str], list[dict]]:
    """Decode each split's files into `<staging>/x_<split>.npy` a few chunks at a time: memory holds chunks,
    never the dataset. The file rows come back with their pixel hashes, taken from the chunks as they pass."""
    workers = workers or os.cpu_count() or 1
    decoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    failures: list[str] = []
    rows: list[dict] = []
    total = sum(len(items) for items in splits.values())
    with (
        decoding_pool(workers) as pool,
        Progress("decoding images", total, "files", log) as progress,
    ):
        for split, items in splits.items():
            paths = [str(path) for path, _ in items]
            labels = np.array([label for _, label in items], np.int32)
            ok = np.zeros(len(paths), bool)
            with PixelFile(staging / f"x_{split}.npy", (size, size, 3), len(paths)) as pixels:
                done = 0
                for chunk in decode_files_ahead(paths, size, pool, DECODE_CHUNK_FILES, ahead=2 * workers):
                    progress.advance(len(chunk.errors), f"decoding {split} images")
                    pixels.append(chunk.pixels[chunk.decoded])
                    for offset, (original, kind, error) in enumerate(zip(chunk.sizes, chunk.kinds, chunk.errors,
                                                                         strict=True)):  # fmt: skip
                        path, label = paths[done + offset], labels[done + offset]
                        if error:
                            failures.append(f"{path}: {error}")
                            continue
                        ok[done + offset] = True
                        rows.append(
                            {"split": split, "path": Path(path).relative_to(root).as_posix(),
                             "class": class_names[label], "width": original[0], "height": original[1], "kind": kind,
                             "pixels": pixel_hash(chunk.pixels[offset])}
                        )  # fmt: skip
                    done += len(chunk.errors)
            log(f"Decoded {len(paths)} {split} images with {workers} processes")
            decoded[split] = (np.load(pixels.path, mmap_mode="r" if ok.any() else None), labels[ok])
    if failures and not skip_corrupt:
        listing = "\n  ".join(failures[:20]) + (f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else "")
        raise DatasetError(
            f"{len(failures)} file(s) could not be decoded (pass --skip-corrupt to skip them):\n  {listing}"
        )
    for failure in failures:
        log(f"Skipped {failure}")
    return Arrays(*decoded["train"], *decoded["test"]), failures, rows


class PixelFile:
    """A `.npy` of uint8 images written a chunk at a time with plain writes (no memory map, so the written
    pages are the kernel's cache, not this process's memory). The header is written for `most` images and
    rewritten for the count appended when it closes."""

    def __init__(self, path: Path, image_shape: tuple[int, ...], most: int):
        self.path, self.image_shape, self.count = Path(path), tuple(image_shape), 0
        self.handle = open(self.path, "wb")  # noqa: SIM115 (closed by __exit__)
        self.header = self._header(most)
        self.handle.write(self.header)

    def _header(self, count: int) -> bytes:
        buffer = io.BytesIO()
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *self.image_shape)}
        np.lib.format.write_array_header_1_0(buffer, header)
        return buffer.getvalue()

    def append(self, images: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(images, np.uint8).tobytes())
        self.count += len(images)

    def __enter__(self) -> PixelFile:
        return self

    def __exit__(self, *exc) -> None:
        final = self._header(self.count)
        try:
            if len(final) == len(self.header):  # same padded length: rewrite in place
                self.handle.seek(0)
                self.handle.write(final)
                return
            self.handle.close()  # a header that grew shorter than its padding: move the pixels once
            with open(self.path, "rb") as source, open(self.path.with_suffix(".tmp"), "wb") as target:
                source.seek(len(self.header))
                target.write(final)
                shutil.copyfileobj(source, target, 1 << 24)
            os.replace(self.path.with_suffix(".tmp"), self.path)
        finally:
            self.handle.close()


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


def _read_cifar_batches(root: Path) -> tuple[Arrays, list[str]]:
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


def _download_keras_cifar10() -> tuple[Arrays, list[str]]:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # urllib raises a zoo of types when offline
        raise DatasetError(
            f"Keras' CIFAR-10 download failed ({error}); offline, point CIFAR10_DIR or --data at a local copy"
        ) from None
    labels = (y.reshape(-1).astype(np.int32) for y in (y_train, y_test))
    y_train, y_test = labels
    return Arrays(x_train, y_train, x_test, y_test), list(CIFAR10_CLASSES)
