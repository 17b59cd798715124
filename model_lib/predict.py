"""Batch prediction: classify the images of a folder into a CSV, one row per image-like file.

The folder is walked lazily in sorted path order and cut into shards; each shard is decoded by a
pool of worker processes (small images are GIL-bound Python work, so threads would not use the
other cores), classified in batches, and written to its own part file. Parts are then concatenated, in order,
into a temporary file that is renamed over the output: a reader never sees a partial CSV.
"""

from __future__ import annotations

import csv
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from multiprocessing import current_process, get_context
from pathlib import Path

import numpy as np

from model_lib.fileio import atomic_open, read_json
from model_lib.images import DecodedFiles, FolderEntry, decode_files_in_pool, walk_folder
from model_lib.registry import (
    MANIFEST_FILE,
    MODEL_FILE,
    ChecksumError,
    RegistryError,
    load_verified_model,
    parse_reference,
    verify_version,
)

OUTSIDE_LINK_ERROR = "link points outside the input folder (not followed)"


@dataclass(frozen=True)
class ModelInfo:
    """What a prediction run needs to know about its model, resolved once from a reference."""

    reference: str
    path: str  # the version folder
    model_file: str  # model.keras, or a .tflite export in the same folder
    version: str
    class_names: list[str]
    image_size: int


def resolve_model(reference: str, artifacts_root: Path) -> ModelInfo:
    """Resolve a registry reference, a version folder or a `.tflite` export to the model and its metadata.

    Raises:
        RegistryError: The reference does not resolve, or a `.tflite` file is not a registered export.
    """
    model_file = MODEL_FILE
    candidate = Path(reference).expanduser()
    if candidate.suffix == ".tflite" and candidate.is_file():
        version_dir, model_file = candidate.resolve().parent, candidate.name
        if not (version_dir / MANIFEST_FILE).is_file():
            raise RegistryError(f"{candidate}: not inside a registered version folder (no {MANIFEST_FILE} beside it)")
    else:
        version_dir = parse_reference(reference, artifacts_root)
    manifest = read_json(version_dir / MANIFEST_FILE)
    if model_file not in manifest["files"]:
        raise RegistryError(f"{version_dir / model_file}: not listed in the version's manifest")
    label = f"{manifest.get('name', version_dir.parent.name)} v{manifest['version']}"
    return ModelInfo(
        reference=reference,
        path=str(version_dir),
        model_file=model_file,
        version=label if model_file == MODEL_FILE else f"{label} ({model_file})",
        class_names=list(manifest["dataset"]["class_names"]),
        image_size=int(manifest["config"]["image_size"]),
    )


_models: dict[str, object] = {}
_models_lock = threading.Lock()


def load_model_once(model: ModelInfo):
    """The checksum-verified model, loaded once per process and shared by its threads."""
    key = str(Path(model.path) / model.model_file)
    with _models_lock:
        if key not in _models:
            if model.model_file == MODEL_FILE:
                loaded = load_verified_model(Path(model.path))
            else:
                from model_lib.export import TFLiteClassifier

                problems = [p for p in verify_version(Path(model.path)) if model.model_file in p]
                if problems:
                    raise ChecksumError("; ".join(problems))
                loaded = TFLiteClassifier(key)
            # Build the predict function here, under the lock, not in two shard threads at once.
            loaded.predict(np.zeros((1, *loaded.input_shape[1:]), np.uint8), verbose=0)
            _models[key] = loaded
        return _models[key]


def csv_columns(top_k: int) -> list[str]:
    """The CSV header for `top_k` ranked predictions."""
    ranked = [name for rank in range(1, top_k + 1) for name in (f"top{rank}_label", f"top{rank}_probability")]
    return ["path", "status", "label", "confidence", *ranked, "width", "height", "error"]


def shards(entries: Iterable[FolderEntry], shard_size: int) -> Iterator[list[FolderEntry]]:
    """Cut a stream of folder entries into lists of at most `shard_size` image-like entries."""
    iterator = iter(entries)
    while shard := list(islice(iterator, shard_size)):
        yield shard


def image_like_entries(input_dir: Path, recursive: bool, skipped: list[str]) -> Iterator[FolderEntry]:
    """Entries that get a CSV row (images and links out of the folder); other files go to `skipped`."""
    for entry in walk_folder(input_dir, recursive):
        if entry.kind == "not_image":
            skipped.append(entry.relative_path)
        else:
            yield entry


_decode_pool: ProcessPoolExecutor | None = None
_decode_pool_lock = threading.Lock()  # not the models' lock: a shard must not wait on another's model load


def decode_pool() -> ProcessPoolExecutor | None:
    """This process's decoding pool (one process per core), or None where children are not allowed.

    Dask workers are daemonic processes and may not fork; they decode in-process, one per core.
    """
    global _decode_pool
    if current_process().daemon or (os.cpu_count() or 1) < 2:
        return None
    with _decode_pool_lock:
        if _decode_pool is None:
            # spawn, not fork: the parent holds TensorFlow's and Prefect's threads.
            _decode_pool = ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("spawn"))
        return _decode_pool


def decode_shard(input_dir: str, entries: list[FolderEntry], size: int) -> Callable[[], DecodedFiles]:
    """Start decoding a shard's entries over this process's decoding pool; returns a function that waits.

    Results come in entry order. A link out of the input folder is never opened: it is recorded
    as an error.
    """
    root = Path(input_dir)
    inside = [i for i, entry in enumerate(entries) if entry.kind != "outside_link"]
    per_worker = max(1, -(-len(inside) // (os.cpu_count() or 1)))
    pending = decode_files_in_pool([root / entries[i].relative_path for i in inside], size, decode_pool(), per_worker)
    if len(inside) == len(entries):
        return pending

    def with_links() -> DecodedFiles:
        decoded = pending()
        pixels = np.zeros((len(entries), size, size, 3), np.uint8)
        pixels[inside] = decoded.pixels
        sizes: list = [None] * len(entries)
        errors = [OUTSIDE_LINK_ERROR] * len(entries)
        for j, i in enumerate(inside):
            sizes[i], errors[i] = decoded.sizes[j], decoded.errors[j]
        return DecodedFiles(pixels, sizes, errors)

    return with_links


def classify_shard(
    input_dir: str,
    entries: list[FolderEntry],
    model: ModelInfo,
    part_path: str,
    top_k: int = 3,
    batch_size: int = 256,
) -> dict:
    """Decode, classify and write one shard's rows (without header) to `part_path`.

    Returns:
        Counts: `ok`, `error`.
    """
    pending = decode_shard(input_dir, entries, model.image_size)
    keras_model = load_model_once(model)  # loads while the pool decodes
    decoded = pending()
    good = np.flatnonzero(decoded.decoded)
    probabilities = np.zeros((len(entries), len(model.class_names)), np.float32)
    if len(good):
        batch = decoded.pixels[good]
        # predict_on_batch per chunk: Keras' predict() builds a tf.data pipeline per call, ~10% slower here.
        probabilities[good] = np.concatenate(
            [keras_model.predict_on_batch(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)]
        )
    top_k = min(top_k, len(model.class_names))
    ranks = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    counts = {"ok": 0, "error": 0}
    with open(part_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for i, entry in enumerate(entries):
            error = decoded.errors[i]
            if error:
                counts["error"] += 1
                writer.writerow([entry.relative_path, "error", "", "", *[""] * (2 * top_k), "", "", error])
                continue
            counts["ok"] += 1
            ranked = [value for c in ranks[i] for value in (model.class_names[c], f"{probabilities[i, c]:.6f}")]
            writer.writerow([entry.relative_path, "ok", ranked[0], ranked[1], *ranked, *decoded.sizes[i], ""])
    return counts


def merge_parts(part_paths: list[str], output_csv: Path, top_k: int, class_count: int) -> None:
    """Concatenate part files in order under a header, atomically replacing `output_csv`."""
    with atomic_open(output_csv, "w", newline="", encoding="utf-8") as out:
        csv.writer(out).writerow(csv_columns(min(top_k, class_count)))
        for part in part_paths:
            with open(part, encoding="utf-8", newline="") as handle:
                while chunk := handle.read(1 << 20):
                    out.write(chunk)


def default_output_csv(artifacts_root: Path, input_dir: Path) -> Path:
    """`ARTIFACTS_DIR/predictions/<folder name>.csv`."""
    return artifacts_root / "predictions" / f"{input_dir.resolve().name or 'root'}.csv"
