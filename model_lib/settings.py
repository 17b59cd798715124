"""Settings read from the environment at call time, so tests and the CLI can change them."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

KERAS_DOWNLOAD = "keras"
"""The `data` value that selects Keras' CIFAR-10 download (the online default)."""

DEFAULT_MODEL_NAME = "cifar10"
"""The registry name of models trained on CIFAR-10, and the name model references default to."""

REGISTRY_FOLDER = "models"
"""The registry's folder under ARTIFACTS_DIR: `models/<name>/v<N>/` (a stable contract)."""

INBOX_FOLDER = "inbox"
"""batch-predict's default input folder under ARTIFACTS_DIR (the deployment's inbox)."""

RESULTS_FOLDER = "prefect-results"
"""Where Prefect keeps the flows' return values, under the local work folder (`work_dir`)."""

CACHE_ENV = "CIFAR_PIPELINE_CACHE"
"""The local cache folder's variable (see `work_dir`)."""

DEFAULT_CACHE = "~/.cache/cifar-pipeline"
"""The local cache when `ARTIFACTS_DIR` is an object store and `CIFAR_PIPELINE_CACHE` is unset."""

MACHINE_CACHE_ENV = "CIFAR_PIPELINE_MACHINE_CACHE"
"""Where facts about this machine are kept for later runs (the bf16 probe, JAX's compiled programs), whatever their
ARTIFACTS_DIR: default `cache/` in the local cache (`model_lib.precision.machine_cache_dir`)."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether a location names an object store (`s3://...`) rather than a local folder (`file://` is local)."""
    return urlparse(str(location)).scheme not in ("", "file")


def artifacts_location() -> str:
    """Where shared outputs go (the registry, prediction CSVs): `ARTIFACTS_DIR`, default `./artifacts`.

    An object-store URL as given; a local folder as an absolute path.
    """
    raw = os.environ.get("ARTIFACTS_DIR") or "artifacts"
    return raw.rstrip("/") if is_url(raw) else str(Path(raw.removeprefix("file://")).expanduser().resolve())


def work_dir() -> Path:
    """The local folder for what is only a cache (decoded datasets, run folders, downloaded versions,
    the precision probe): `CIFAR_PIPELINE_CACHE`; else `ARTIFACTS_DIR` itself when that is local, as
    it always was; else `~/.cache/cifar-pipeline`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    location = artifacts_location()
    return Path(DEFAULT_CACHE).expanduser() if is_url(location) else Path(location)


CPU_DEVICES_ENV = "CIFAR_PIPELINE_CPU_DEVICES"
"""Split the CPU into this many devices, so the multi-device (data-parallel) path runs without accelerators."""


def cpu_devices() -> int:
    """`CIFAR_PIPELINE_CPU_DEVICES` (default 1): the CPU devices training splits its batches over when
    there is no accelerator. Tests set 2, so the code that spreads training over several GPUs runs on
    every CI machine; on a real machine leave it unset."""
    raw = os.environ.get(CPU_DEVICES_ENV) or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{CPU_DEVICES_ENV}={raw!r}: a whole number of devices, at least 1")
    return int(raw)


def default_data_source() -> str:
    """The training data: `CIFAR10_DIR` when set, else Keras' download."""
    return os.environ.get("CIFAR10_DIR") or KERAS_DOWNLOAD


TRAIN_EXTRA = "pip install 'cifar-pipeline[train]'"
"""How to add what training needs to a serving install (pyproject.toml's `train` extra)."""


class MissingTrainingInstall(RuntimeError):
    """Keras or its backend is not installed: this install serves TFLite exports only."""


def require_keras(what: str) -> None:
    """Refuse, in one line and before any work, `what` where Keras or its backend (`KERAS_BACKEND`, TensorFlow by
    default) is not installed. Looks the packages up without importing them (TensorFlow's import takes seconds).

    Raises:
        MissingTrainingInstall: Naming what is missing and how to install it.
    """
    from importlib.util import find_spec

    missing = [name for name in ("keras", os.environ.get("KERAS_BACKEND") or "tensorflow") if find_spec(name) is None]
    if missing:
        raise MissingTrainingInstall(
            f"{what} needs {' and '.join(missing)}, which this install does not have: {TRAIN_EXTRA}"
        )
