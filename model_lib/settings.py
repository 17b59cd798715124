"""Settings read from the environment at call time, so tests and the CLI can change them."""

from __future__ import annotations

import os
from pathlib import Path

KERAS_DOWNLOAD = "keras"
"""The `data` value that selects Keras' CIFAR-10 download (the online default)."""

DEFAULT_MODEL_NAME = "cifar10"
"""The registry name of models trained on CIFAR-10, and the name model references default to."""


def artifacts_dir() -> Path:
    """Root of every output: `ARTIFACTS_DIR`, default `./artifacts`."""
    return Path(os.environ.get("ARTIFACTS_DIR") or "artifacts").resolve()


def default_data_source() -> str:
    """The training data: `CIFAR10_DIR` when set, else Keras' download."""
    return os.environ.get("CIFAR10_DIR") or KERAS_DOWNLOAD
