"""Batch prediction: classify the images of a folder into a CSV, one row per image-like file.

The folder is walked lazily in sorted path order and cut into shards; each shard is decoded by a
pool of worker processes (small images are GIL-bound Python work, so threads would not use the
other cores), classified in batches, and written to its own part file. Parts are then concatenated, in order,
into a temporary file that is renamed over the output: a reader never sees a partial CSV.
"""

from __future__ import annotations

import csv
import gc
import inspect
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from multiprocessing import current_process
from pathlib import Path

import numpy as np

from model_lib.config import BATCH_IMAGES, TOP_K, ConfigError, check_count, check_engine, option
from model_lib.fileio import read_json
from model_lib.flags import flags
from model_lib.images import (
    ENTRY_ERRORS,
    DecodeTimeout,
    FolderEntry,
    decode_files,
    decode_files_in_pool,
    decoding_pool,
    walk_folder,
)
from model_lib.inference import CascadeClassifier, KerasClassifier, export_classifier
from model_lib.models import served_with_features, unwrap_tta, with_features
from model_lib.onnx_export import require_onnx
from model_lib.ood import FeatureClassifier, FeatureRule
from model_lib.prediction_csv import (
    check_output,
    check_remote_output,
    csv_columns,
    csv_row,
    csv_text,
    default_output_csv,
    ranked_columns,
)
from model_lib.progress import Progress, check_stop, find
from model_lib.registry import parse_reference
from model_lib.runs import MODEL_FILE
from model_lib.serving import (
    EXPORT_SUFFIXES,
    ONNX_FORMATS,
    SERVING_ORDER,
    cascade_rule,
    export_feature_rule,
    served_first_view,
    serving_exports,
)
from model_lib.settings import is_url, require_keras, work_dir
from model_lib.sources import local_copy
from model_lib.versions import MANIFEST_FILE, ChecksumError, RegistryError, load_verified_model, verify_version

CASCADE_NOTE = "first view; every view when unsure"  # how a cascade-served model is named in the CSV


@dataclass(frozen=True)
class ModelInfo:
    """What a prediction run needs to know about its model, resolved once from a reference."""

    reference: str
    path: str  # the version folder
    model_file: str  # model.keras, or a .tflite or .onnx export in the same folder
    version: str
    class_names: list[str]
    image_size: int
    unsure_below: float | None = None  # calibrated confidence below which a row is flagged low_confidence
    texture_range: list[float] | None = None  # image texture outside it is flagged out_of_distribution
    export_notes: tuple[str, ...] = ()  # an export passed over when the reference was resolved, and why
    calibrated_on: str = ""  # what the calibration was fitted on, or why it was not (the manifest's record)
    # Served first view first (model_lib.inference.CascadeClassifier): (temperature scale, margin), or None.
    cascade: tuple[float, float] | None = None
    first_view_file: str = ""  # the first view's own export when a TFLite export is served first view first
    feature_rule: str = ""  # the out_of_distribution flag's feature-space rule (model_lib.ood) in the version, if used

    @property
    def notes(self) -> tuple[str, ...]:
        """Warnings for the run's log: exports passed over; a flag column that stays empty, and why."""
        if self.unsure_below is not None:
            return self.export_notes
        why = self.calibrated_on or "registered before calibration existed"
        rule = (
            f"{self.label} has no unsure rule ({why}): the flag column stays empty; {option('unsure_below')} P sets one"
        )
        return (*self.export_notes, rule)

    @property
    def label(self) -> str:
        """The version without the file that answers for it: `cifar10 v3`."""
        return self.version.split(" (")[0]

    @property
    def provenance(self) -> str:
        """The CSV's `model` cell: the reference asked for, and the version and file that answered it."""
        how = f" ({CASCADE_NOTE})" if self.cascade else ""
        return f"{self.reference} -> {self.label} {self.model_file}{how}"


@dataclass(frozen=True)
class PredictionPlan:
    """A checked prediction request: the folder, the CSV to write and the model."""

    root: Path
    output: Path  # where the CSV is written: the output itself, or a local copy for `publish_to`
    model: ModelInfo
    publish_to: str | None = None  # the object-store URL the CSV is uploaded to once complete


def plan_request(request: Mapping[str, object], artifacts_root: str | os.PathLike) -> PredictionPlan:
    """`plan_prediction` of a prediction request (`model_lib.requests.PREDICT_REQUEST`'s fields, by name), as the
    CLI checks it before Prefect starts and the flow again in its run."""
    takes = inspect.signature(plan_prediction).parameters
    return plan_prediction(
        **{name: value for name, value in request.items() if name in takes}, artifacts_root=artifacts_root
    )


def plan_prediction(
    input_dir: str,
    output_csv: str | None,
    model: str,
    top_k: int,
    batch_size: int,
    shard_size: int,
    artifacts_root: str | os.PathLike,
    overwrite: bool = False,
    unsure_below: float | None = None,
    engine: str = "auto",
) -> PredictionPlan:
    """Check a prediction request before any work starts (the CLI calls it before Prefect does).

    Raises:
        ConfigError: A bad option, a missing input folder, or an output the tool must not write.
        RegistryError: The model reference does not resolve.
    """
    for field, value in (("top_k", top_k), ("batch_size", batch_size), ("shard_size", shard_size)):
        check_count(field, value)
    root = local_copy(input_dir) if is_url(input_dir) else Path(input_dir).expanduser()
    if not root.is_dir():
        problem = "not a folder (predict classifies the images in a folder)" if root.exists() else "folder not found"
        raise ConfigError(f"{root}: {problem}")
    root = root.resolve()
    if unsure_below is not None and not 0 <= unsure_below <= 1:
        raise ConfigError(f"{option('unsure_below')} is a probability in [0, 1], not {unsure_below}")
    check_engine(engine)
    info = resolve_model(model, artifacts_root, engine)
    if unsure_below is not None:
        info = replace(info, unsure_below=unsure_below, texture_range=info.texture_range or [0.0, float("inf")])
    if top_k > len(info.class_names):
        raise ConfigError(f"{option('top_k')} {top_k} is more than the model's {len(info.class_names)} classes")
    folder_name = input_dir.rstrip("/").rsplit("/", 1)[-1] if is_url(input_dir) else root.name
    output = output_csv or default_output_csv(artifacts_root, folder_name)
    if is_url(output):
        check_remote_output(output, overwrite)
        return PredictionPlan(root, work_dir() / "predictions" / output.rsplit("/", 1)[-1], info, output)
    output = Path(output).expanduser().resolve()
    check_output(output, artifacts_root, overwrite)
    return PredictionPlan(root, output, info)


def resolve_model(reference: str, artifacts_root: Path, engine: str = "auto") -> ModelInfo:
    """Resolve a registry reference, a version folder or a `.tflite` or `.onnx` export to the model and its metadata.

    A reference to a version runs, under the `auto` engine, its fastest TFLite export that passed
    parity with the Keras model (`model_lib.serving`), and `model.keras` otherwise or under `keras`;
    under `onnx`, its fastest ONNX export that passed parity, and none is an error.

    Raises:
        RegistryError: The reference does not resolve, a `.tflite` or `.onnx` file is not a registered export, or
            the version has no ONNX export that passed parity for `--engine onnx`.
        ConfigError: `--engine onnx` (or an `.onnx` file) in an install without ONNX Runtime.
        MissingTrainingInstall: `model.keras` would serve, and this install has no Keras.
    """
    model_file = MODEL_FILE
    candidate = Path(reference).expanduser()
    if engine == "onnx" or candidate.suffix == ".onnx":
        require_onnx(f"{option('engine')} onnx" if engine == "onnx" else f"{candidate}", ("onnxruntime",))
    if candidate.suffix in EXPORT_SUFFIXES and candidate.is_file():
        version_dir, model_file = candidate.resolve().parent, candidate.name
        if not (version_dir / MANIFEST_FILE).is_file():
            raise RegistryError(f"{candidate}: not inside a registered version folder (no {MANIFEST_FILE} beside it)")
    else:
        version_dir = parse_reference(reference, artifacts_root)
    manifest = read_json(version_dir / MANIFEST_FILE)
    notes, first_view_file = [], ""
    if model_file == MODEL_FILE and engine in SERVING_ORDER:
        for candidate_file in serving_exports(manifest, engine):
            problems = verify_version(version_dir, (candidate_file,))
            if not problems:
                model_file, first_view_file = candidate_file, served_first_view(manifest, candidate_file) or ""
                break
            notes += [f"{problem}; not used" for problem in problems]
    if model_file == MODEL_FILE and engine == "onnx":
        name = f"{manifest.get('name', version_dir.parent.name)}@v{manifest['version']}"
        missing = (f"{name} has no ONNX export that passed parity with its Keras model (cifar-pipeline export "
                   f"{name} --formats {','.join(ONNX_FORMATS)} writes them)")  # fmt: skip
        raise RegistryError("; ".join([*notes, missing]))
    if first_view_file and (problems := verify_version(version_dir, (first_view_file,))):
        notes += [f"{problem}; {model_file} serves every view of every image" for problem in problems]
        first_view_file = ""
    if model_file not in manifest["files"]:
        raise RegistryError(f"{version_dir / model_file}: not listed in the version's manifest")
    label = f"{manifest.get('name', version_dir.parent.name)} v{manifest['version']}"
    calibration = manifest.get("calibration") or {}
    feature_rule = (calibration.get("feature_rule") or {}).get("file", "")
    if feature_rule and model_file != MODEL_FILE:  # an export's features come with a rule of its own
        # The image's own features come from the first view where one serves first, else from the export itself.
        feature_rule, why = export_feature_rule(manifest, first_view_file or model_file)
        if why:
            notes.append(f"{why}: out_of_distribution tests pixel texture only ({option('engine')} keras adds the "
                         "feature-space test)")  # fmt: skip
    if model_file == MODEL_FILE:  # refused here, before any work, on every path: CLI, app and deployment alike
        require_keras(f"serving {label} from model.keras (a TFLite export, from `cifar-pipeline export`, would not)")
    first_view = cascade_rule(manifest) if engine == "auto" and (model_file == MODEL_FILE or first_view_file) else None
    return ModelInfo(
        reference=reference,
        path=str(version_dir),
        model_file=model_file,
        version=label if model_file == MODEL_FILE else f"{label} ({model_file})",
        class_names=list(manifest["dataset"]["class_names"]),
        image_size=int(manifest["config"]["image_size"]),
        unsure_below=calibration.get("unsure_threshold"),
        texture_range=calibration.get("texture_range"),
        export_notes=tuple(notes),
        calibrated_on=calibration.get("fitted_on", ""),
        cascade=first_view,
        first_view_file=first_view_file,
        feature_rule=feature_rule,
    )


_models: dict[str, object] = {}
_models_lock = threading.Lock()


def load_model_once(model: ModelInfo):
    """The checksum-verified model as a classifier of uint8 pixel batches, loaded once per process for its threads."""
    key = f"{Path(model.path) / model.model_file} {model.cascade}"  # one version, served two ways, is two models
    with _models_lock:
        if key not in _models:
            # Under the lock: two shard threads must not trace (or allocate) the same model at once.
            _models[key] = load_classifier(model)
        return _models[key]


def load_classifier(model: ModelInfo):
    """The model's file, checksums verified, as a classifier of uint8 pixel batches, traced and ready."""
    rule = load_feature_rule(Path(model.path), model.feature_rule) if model.feature_rule else None
    if model.model_file == MODEL_FILE:
        keras_model = load_verified_model(Path(model.path))
        network = unwrap_tta(keras_model)[0]
        if model.cascade:  # the first view, the image's own, reports the features
            first_view = with_features(network, rule.layers) if rule else network
            loaded = CascadeClassifier(KerasClassifier(first_view), KerasClassifier(keras_model), *model.cascade)
        else:
            loaded = KerasClassifier(served_with_features(keras_model, rule.layers) if rule else keras_model)
    else:
        files = (model.model_file, model.first_view_file) if model.first_view_file else (model.model_file,)
        problems = verify_version(Path(model.path), files)
        if problems:
            raise ChecksumError("; ".join(problems))
        loaded = export_classifier(Path(model.path) / model.model_file)
        if model.cascade and model.first_view_file:
            first_view = export_classifier(Path(model.path) / model.first_view_file)
            loaded = CascadeClassifier(first_view, loaded, *model.cascade)
    if rule:
        loaded = FeatureClassifier(loaded, rule)
    loaded.predict_on_batch(np.zeros((1, *loaded.input_shape[1:]), np.uint8))
    # TensorFlow and the model are millions of objects that live as long as the process; a
    # full collection scanning them stalled every shard thread ~0.3 s. Stop scanning them.
    gc.freeze()
    return loaded


def load_feature_rule(version_dir: Path, name: str) -> FeatureRule:
    """A version's feature rule (`model_lib.ood`), its checksum verified against the manifest first."""
    if problems := verify_version(version_dir, (name,)):
        raise ChecksumError("; ".join(problems))
    return FeatureRule.load(version_dir / name)


def ranked(probabilities: np.ndarray, top_k: int) -> list[tuple[list[int], list[float]]]:
    """Per image, the `top_k` class indices from most to least probable and their probabilities.

    Ranked per batch and returned as Python values: numpy calls per row took ~0.1 s per 10,000 rows.
    """
    ranks = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return list(zip(ranks.tolist(), np.take_along_axis(probabilities, ranks, axis=1).tolist(), strict=True))


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
            _decode_pool = decoding_pool(os.cpu_count())
        return _decode_pool


class ShardTimeout(RuntimeError):
    """A shard ran past its time limit and was stopped."""


@contextmanager
def _stopped_past(time_limit: float | None, shard_file: str) -> Iterator[None]:
    try:
        yield
    except DecodeTimeout:
        kill_decode_pool()
        raise ShardTimeout(
            f"shard {Path(shard_file).stem} ran past its time limit of {time_limit:g} s and was stopped (a disk, a "
            "decoding process or the model stopped answering)"
        ) from None


def _detach_decode_pool() -> ProcessPoolExecutor | None:
    """This process's decoding pool, now no longer handed out: the next `decode_pool()` starts a new one."""
    global _decode_pool
    with _decode_pool_lock:
        pool, _decode_pool = _decode_pool, None
    return pool


def kill_decode_pool() -> None:
    """Kill this process's decoding pool: a worker stuck in a read would never finish, and would hold this
    process's exit. The next shard starts a new pool."""
    pool = _detach_decode_pool()
    if pool is not None:
        for process in list((pool._processes or {}).values()):  # Python 3.14 has pool.kill_workers() for this
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def reset_workers() -> None:
    """Shut down this process's decoding pool and forget its loaded models: the next run starts cold."""
    pool = _detach_decode_pool()
    if pool is not None:
        pool.shutdown(cancel_futures=True)  # a stopped run's queued chunks are not decoded
    with _models_lock:
        _models.clear()


def start_local_workers(model: ModelInfo) -> None:
    """Start this process's decoding pool and load the model in the background.

    For a flow whose shards run in this process: the pool's processes start and TensorFlow loads
    while the folder is walked and the first shards decode, instead of inside the first shard.
    A load that fails here fails again, with its error, in the shard that needs the model.
    """
    pool = decode_pool()
    if pool is not None:
        for _ in range(os.cpu_count() or 1):  # each submit starts a process while none is idle
            pool.submit(decode_files, [], model.image_size)

    def load_quietly() -> None:
        try:
            load_model_once(model)
        except Exception:  # noqa: BLE001 - reported by the shard that needs the model
            pass

    threading.Thread(target=load_quietly, name="model-preload", daemon=True).start()


def write_shard(entries: list[FolderEntry], path: Path) -> None:
    """Save a shard's entries for its task: tasks take a file path, not thousands of entries."""
    path.write_text(json.dumps([[entry.relative_path, entry.kind] for entry in entries]), encoding="utf-8")


def read_shard(path: str | Path) -> list[FolderEntry]:
    """The entries saved by `write_shard`."""
    return [FolderEntry(relative_path, kind) for relative_path, kind in read_json(Path(path))]


def classified_rows(
    input_dir: str,
    entries: list[FolderEntry],
    model: ModelInfo,
    top_k: int,
    batch_size: int,
    progress: Progress | None = None,
    deadline: float | None = None,
) -> Iterator[tuple[list[str], str, tuple[int, int] | None, str]]:
    """Decode and classify entries in order: `(ranked cells, flag, original size, error)` per entry.

    Past `deadline` (`time.monotonic()`), `DecodeTimeout` is raised, whether waiting for decoding or after a
    chunk was classified.

    The ranked cells are the `top_k` labels (spreadsheet-safe, see `csv_text`) and probabilities,
    alternating, empty for an error.
    The shard's files are decoded by the pool in chunks of `batch_size`; each chunk is classified
    as soon as it arrives, while the pool decodes the next ones. A link out of the input folder
    is never opened: it is recorded as an error.
    """
    root = Path(input_dir)
    inside = [entry for entry in entries if entry.kind not in ENTRY_ERRORS]
    chunks = decode_files_in_pool(
        [root / entry.relative_path for entry in inside], model.image_size, decode_pool(), batch_size, deadline
    )
    classifier = load_model_once(model)  # loads (or waits for the preload) while the pool decodes
    safe_names = [csv_text(name) for name in model.class_names]  # once per shard, not once per row

    def inside_rows():
        for chunk in chunks:
            good = chunk.decoded
            probabilities = np.zeros((len(good), len(model.class_names)), np.float32)
            outside = np.zeros(len(good), bool)
            if good.any():
                probabilities[good], beyond = classifier.flagged(chunk.pixels[good])
                outside[good] = False if beyond is None else beyond
            if deadline is not None and time.monotonic() > deadline:
                raise DecodeTimeout
            row_flags = flags(probabilities, chunk.pixels, model.unsure_below, model.texture_range, outside)
            if progress is not None:
                progress.advance(len(chunk.errors))
            rows = zip(ranked(probabilities, top_k), row_flags, chunk.sizes, chunk.errors, strict=True)
            for (labels, values), flag, size, error in rows:
                pairs = [] if error else zip(labels, values, strict=True)
                cells = [cell for c, v in pairs for cell in (safe_names[c], f"{v:.6f}")]
                yield cells, "" if error else flag, size, error

    rows = inside_rows()
    for entry in entries:
        yield ([], "", None, ENTRY_ERRORS[entry.kind]) if entry.kind in ENTRY_ERRORS else next(rows)


def classify_shard(
    input_dir: str,
    shard_file: str,
    model: ModelInfo,
    part_path: str,
    top_k: int = TOP_K,
    batch_size: int = BATCH_IMAGES,
    progress_key: str | None = None,
    time_limit: float | None = None,
) -> dict:
    """Decode, classify and write the rows (without header) of the shard saved in `shard_file` to `part_path`.

    Classified images advance the progress registered under `progress_key` in this process, if any. Past
    `time_limit` seconds the shard stops, its decoding processes killed (a stuck one would hold the exit).

    Returns:
        Counts: `ok`, `error`, and `flagged` (ok rows flagged `low_confidence` or `out_of_distribution`).

    Raises:
        Stopped: A stop was requested, before this shard started or while it ran.
        ShardTimeout: The shard ran past `time_limit`.
    """
    check_stop()  # a stopped run's queued shards end here, not after decoding a chunk each
    deadline = None if time_limit is None else time.monotonic() + time_limit
    entries = read_shard(shard_file)
    top_k = min(top_k, len(model.class_names))
    counts = {"ok": 0, "error": 0, "flagged": 0}
    provenance = csv_text(model.provenance)
    columns, ranked_names = csv_columns(top_k), ranked_columns(top_k)
    rows = classified_rows(input_dir, entries, model, top_k, batch_size, find(progress_key), deadline)
    with open(part_path, "w", newline="", encoding="utf-8") as handle, _stopped_past(time_limit, shard_file):
        writer = csv.writer(handle)
        for entry, (ranked, flag, size, error) in zip(entries, rows, strict=True):
            path = csv_text(entry.relative_path)
            if error:
                counts["error"] += 1
                writer.writerow(csv_row(columns, path=path, status="error", error=csv_text(error), model=provenance))
            else:
                counts["ok"] += 1
                counts["flagged"] += flag not in ("ok", "")
                cells = dict(zip(ranked_names, ranked, strict=True))
                writer.writerow(
                    csv_row(columns, path=path, status="ok", label=ranked[0], confidence=ranked[1], flag=flag,
                            width=size[0], height=size[1], model=provenance, **cells)
                )  # fmt: skip
    return counts
