"""A real Keras model registered without training, as the register task would: for tests and bench scripts.

A helper module, not a test module: bench/ imports it too, so it holds no fixtures or tests.
"""

from pathlib import Path

import numpy as np

from model_lib.registry import Registry
from model_lib.sources import CIFAR10_CLASSES
from model_lib.train import probe_images


def register_keras_model(artifacts: Path, model, tmp_path: Path, class_names=CIFAR10_CLASSES, accuracy=0.5) -> Path:
    """Register a real Keras model the way the register task does (probe included)."""
    run = tmp_path / "registered_run"
    run.mkdir(exist_ok=True)
    model.save(run / "model.keras")
    inputs = probe_images(np.zeros((2, 32, 32, 3), np.uint8), 0)
    np.savez(run / "probe.npz", inputs=inputs, outputs=model.predict(inputs, verbose=0))
    manifest = {
        "architecture": model.name,
        "config": {"image_size": 32},
        "metrics": {"test_accuracy": accuracy},
        "dataset": {"class_names": class_names, "test_fingerprint": "t"},
    }
    registration = Registry(artifacts).register({"model.keras": run / "model.keras", "probe.npz": run / "probe.npz"},
                                                manifest)  # fmt: skip
    return Path(registration.path)
