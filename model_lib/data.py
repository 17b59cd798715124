"""Ingest: read a dataset once into uint8 arrays cached under `<cache>/datasets/<fingerprint>/` (`settings.work_dir`).

The sources (an image folder, `cifar-10-batches-py`, Keras' download) and the `auto` image side are
model_lib/sources.py's. Here: the decoding of a folder in parallel, straight into the cache's files (a dataset
larger than memory never lives in memory whole), the fingerprint that names a cache entry, a listing key that
finds it again in a second, and the readers of what the cache holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from model_lib.config import AUTO, option
from model_lib.fileio import read_json, write_json
from model_lib.images import decode_files_ahead, decoding_pool, resize_pixels
from model_lib.progress import Progress
from model_lib.settings import KERAS_DOWNLOAD, is_url
from model_lib.sources import (
    ARRAY_SIDE,
    Arrays,
    DatasetError,
    balanced_subset,
    chosen_size,
    download_keras_cifar10,
    list_image_folder,
    local_copy,
    read_cifar_batches,
    resolve_source,
)

CACHE_FORMAT = 3  # bump when the cached arrays' layout, the decoder's output or the fingerprint changes
DECODE_CHUNK_FILES = 512  # files per worker task: large enough to amortise process IPC
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
DATASETS_FOLDER = "datasets"  # under the local work dir: one folder per ingested dataset, named by its fingerprint
DATASET_FILE = "dataset.json"  # a cache entry's DatasetInfo, written last: its presence says the entry is whole
FILE_TABLE = "files.csv"  # one row per cached image: split, path, class, original size and kind, pixel hash
KEYS = "dataset-keys"  # beside datasets/: <listing key>.json, what a folder listing (names, sizes, times) decoded to
STAGING_PREFIX = ".tmp-"  # datasets/<this><id>/: a cache entry being assembled
STALE_STAGING_HOURS = 6  # an assembly untouched this long was left by a killed ingest (a live one writes on)


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
    datasets_dir = Path(artifacts_root) / DATASETS_FOLDER
    listing_key = None
    if kind == "image_folder":
        root = local_copy(data, log) if is_url(data) else root
        source = f"image_folder:{data if is_url(data) else root}"
        class_names, splits = list_image_folder(root, max_train_images, max_test_images)
        image_size, size_reason = chosen_size(image_size, [path for path, _ in splits["train"]])
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
            arrays, class_names = read_cifar_batches(root)
            source = f"cifar-10-batches-py:{root}"
        else:
            arrays, class_names = download_keras_cifar10()
            source = KERAS_DOWNLOAD
        arrays = Arrays(
            *balanced_subset(arrays.x_train, arrays.y_train, max_train_images),
            *balanced_subset(arrays.x_test, arrays.y_test, max_test_images),
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


def cached_dataset(artifacts_root: str | os.PathLike, fingerprint: str, purpose: str) -> DatasetInfo:
    """The dataset ingest cached under `artifacts_root` with this fingerprint (a version's own, as its manifest names).

    Raises:
        FileNotFoundError: It is not cached here; the message says what `purpose` needs it for.
    """
    cache_dir = Path(artifacts_root) / DATASETS_FOLDER / fingerprint
    info = _load_info(cache_dir)
    if info is None:
        raise FileNotFoundError(
            f"{cache_dir}: the dataset this version was trained on is not cached; train or ingest on the same data "
            f"first so {purpose}"
        )
    return info


def _load_info(cache_dir: Path) -> DatasetInfo | None:
    meta = cache_dir / DATASET_FILE
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
        write_json(staging / DATASET_FILE, info.to_dict())
        try:
            os.rename(staging, cache_dir)
        except OSError:
            if not (cache_dir / DATASET_FILE).is_file():  # not a concurrent twin: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
            f"{len(failures)} file(s) could not be decoded (pass {option('skip_corrupt')} to skip them):\n  {listing}"
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
