"""Live classification behind the HTTP app (`flows/app.py`): uploads decoded in memory, a model that follows its
registry alias, and images from many clients classified together in one model call.

* `LiveModel` serves one reference (`cifar10@champion`). A background check resolves it again every
  few seconds; when the alias has moved (a promotion, a rollback) the new version is loaded,
  checksums verified and traced, and only then swapped in: a request is classified by the old
  version or the new one, never by a half-loaded one.
* `Batcher` is dynamic batching as TF Serving and Triton do it: one thread takes every waiting
  request (after a short wait for more), classifies them in one call, and hands each its rows.
  While a batch runs, the next requests queue up, so the batch grows with the load.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue

import numpy as np

from model_lib.config import BATCH_IMAGES, RELOAD_SECONDS
from model_lib.flags import flags
from model_lib.images import ImageDecodeError, decode_rgb
from model_lib.predict import ModelInfo, load_classifier, ranked, resolve_model
from model_lib.prediction_csv import csv_columns

MAX_FILES = 256  # images per request
BATCH_WAIT_SECONDS = 0.002  # how long the first request of a batch waits for others to join it


@dataclass(frozen=True)
class Served:
    """A model version as it is served: what it is, and its loaded classifier."""

    info: ModelInfo
    classifier: object = field(repr=False)


@dataclass(frozen=True)
class Upload:
    """One uploaded image, decoded to the served model's size, or why it could not be."""

    name: str
    pixels: np.ndarray | None  # (size, size, 3) uint8
    size: tuple[int, int] | None  # the original (width, height)
    error: str = ""


def decode_upload(name: str, data: bytes, image_size: int, max_pixels: int) -> Upload:
    """Decode an upload held in memory (it never touches the disk) exactly as batch prediction decodes a file."""
    buffer = io.BytesIO(data)
    buffer.name = name
    try:
        pixels, original, _ = decode_rgb(buffer, (image_size, image_size), max_pixels)
    except ImageDecodeError as error:
        return Upload(name, None, None, error.reason)
    return Upload(name, pixels, original)


def prediction_rows(
    served: Served,
    uploads: list[Upload],
    pixels: np.ndarray | None,
    probabilities: np.ndarray,
    top_k: int,
    outside: np.ndarray | None = None,
) -> list[dict]:
    """One object per upload with the prediction CSV's columns and their meaning (see docs/prediction.md),
    typed for JSON (numbers as numbers, empty cells as null), and the version that answered.

    `pixels`, `probabilities` and `outside` (the feature rule's verdicts, or None) are those of the uploads
    that decoded, in order (None and empty if none did).
    """
    info = served.info
    top_k = min(top_k, len(info.class_names))
    row_flags = iter(
        flags(probabilities, pixels, info.unsure_below, info.texture_range, outside) if pixels is not None else []
    )
    answers = iter(ranked(probabilities, top_k))
    rows = []
    for upload in uploads:
        row = dict.fromkeys(csv_columns(top_k))
        row.update(path=upload.name, model=info.provenance, version=info.version)
        if upload.error:
            row.update(status="error", error=upload.error)
        else:
            classes, values = next(answers)
            row.update(status="ok", label=info.class_names[classes[0]], confidence=values[0], flag=next(row_flags),
                       width=upload.size[0], height=upload.size[1])  # fmt: skip
            for rank, (index, value) in enumerate(zip(classes, values, strict=True), start=1):
                row[f"top{rank}_label"], row[f"top{rank}_probability"] = info.class_names[index], value
        rows.append(row)
    return rows


class LiveModel:
    """The model a reference names now, swapped for the next version when the reference moves.

    Raises (from the constructor): RegistryError or ChecksumError when the reference does not resolve
    or its files fail their checksums: the app does not start without a model it can trust.
    """

    def __init__(self, reference: str, artifacts_root: str, engine: str = "auto", resolved: ModelInfo | None = None):
        """`resolved`: the reference already resolved by the caller (the CLI, to know whether Keras is needed)."""
        self.reference, self.artifacts_root, self.engine = reference, artifacts_root, engine
        self.served = self._load(resolved or resolve_model(reference, artifacts_root, engine))
        self.problem = ""  # why the last check could not follow the reference ("" when it could)

    @staticmethod
    def _load(info: ModelInfo) -> Served:
        return Served(info, load_classifier(info))

    def refresh(self) -> bool:
        """Resolve the reference again; load and swap in the version it names now. True if it changed.

        A version that fails to load (a checksum differs, a file is missing) is not served: the
        current one stays, and `problem` says why.
        """
        try:
            info = resolve_model(self.reference, self.artifacts_root, self.engine)
            current = self.served.info
            if (info.path, info.model_file) == (current.path, current.model_file):
                self.problem = ""
                return False
            served = self._load(info)
        except Exception as error:  # noqa: BLE001 - kept and reported by /api/health; the old version serves on
            self.problem = f"{self.reference}: {error}"
            return False
        self.served, self.problem = served, ""  # the served pair is one attribute: never half-swapped
        return True

    def follow(self, stop: threading.Event, every: float = RELOAD_SECONDS) -> threading.Thread:
        """Check the reference every `every` seconds in a background thread until `stop` is set."""

        def loop() -> None:
            while not stop.wait(every):
                self.refresh()

        thread = threading.Thread(target=loop, name="follow-reference", daemon=True)
        thread.start()
        return thread


class ModelChanged(RuntimeError):
    """The served model's image size changed between decoding a request and classifying it: decode again."""


@dataclass
class _Request:
    pixels: np.ndarray
    future: Future = field(default_factory=Future)


class Batcher:
    """Classifies the pixels of concurrent requests together, in batches of up to `max_images`.

    `submit` returns a future of `(served, probabilities, outside)`: the version that classified the pixels,
    one row of probabilities per image, and the feature rule's verdicts on them (None without one).
    """

    def __init__(self, model: Callable[[], Served], max_images: int = BATCH_IMAGES,
                 wait: float = BATCH_WAIT_SECONDS):  # fmt: skip
        self._model, self._max, self._wait = model, max_images, wait
        self._queue: SimpleQueue[_Request | None] = SimpleQueue()
        self.batches = 0  # model calls so far, and the images they classified: the batching at work
        self.images = 0
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        request = _Request(pixels)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, images = [first], len(first.pixels)
        deadline = time.monotonic() + self._wait
        while images < self._max:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                break
            if request is None:
                return batch, True
            batch.append(request)
            images += len(request.pixels)
        return batch, False

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = self._collect(first)
            served = self._model()
            size = served.info.image_size
            stale = [request for request in batch if request.pixels.shape[1:3] != (size, size)]
            for request in stale:
                request.future.set_exception(ModelChanged(f"the served model now takes {size}x{size} images"))
            batch = [request for request in batch if request.pixels.shape[1:3] == (size, size)]
            if not batch:
                continue
            try:
                probabilities, outside = served.classifier.flagged(np.concatenate([r.pixels for r in batch]))
            except Exception as error:  # noqa: BLE001 - each waiting request gets it
                for request in batch:
                    request.future.set_exception(error)
                continue
            self.batches, self.images = self.batches + 1, self.images + len(probabilities)
            start = 0
            for request in batch:
                end = start + len(request.pixels)
                verdicts = None if outside is None else outside[start:end]
                request.future.set_result((served, probabilities[start:end], verdicts))
                start = end
