"""The training recipe under Keras' JAX backend on numpy batches: precisions and batch-norm epsilons side by side.

    KERAS_BACKEND=jax python bench/train_jax.py --cifar ../shared/datasets/cifar10 \
        --runs cifar:default:float32:1e-5,cifar:default:mixed_bfloat16:1e-3,digits:smoke:mixed_bfloat16:1e-3:10

Each run is DATA:PROFILE:PRECISION:BN_EPSILON[:EPOCHS], DATA `cifar` (the folder given by --cifar)
or `digits` (scikit-learn's digits written as 8x8 greyscale PNGs, as the tests do). For machines
without TensorFlow or Prefect, such as the lent GPU machine: ingest, the in-memory batches with
augmentation inside the compiled step, model, optimiser with its lookahead, schedule and the
serving model (its TTA) are model_lib's own, as `train-cifar` runs them under JAX, without
per-epoch validation, checkpoints and logs. Prints one JSON line per run (and appends it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(data_root: Path, artifacts: Path, profile: str, precision: str, bn_epsilon: float, epochs: int | None) -> dict:
    import keras

    from model_lib import models
    from model_lib.config import resolve_config
    from model_lib.data import ingest, load_arrays
    from model_lib.preprocess import make_datasets, stratified_split, with_augmentation
    from model_lib.recipe import make_optimizer
    from model_lib.train import to_serving_model

    models.AIRBENCH_BN_EPSILON = bn_epsilon
    config = resolve_config(profile, data=str(data_root), precision=precision, epochs=epochs)
    dataset = ingest(config.data, artifacts, config.image_size, config.max_train_images, config.max_test_images,
                     log=lambda m: None)  # fmt: skip
    arrays = load_arrays(dataset.cache_dir)
    split = stratified_split(np.asarray(arrays.y_train), config.validation_split, config.seed)
    classes = len(dataset.class_names)
    keras.utils.set_random_seed(config.seed)

    batches, _ = make_datasets(arrays.x_train, arrays.y_train, split, classes, config)  # training's pipeline
    steps = config.epochs * len(batches)
    calibration = np.asarray(arrays.x_train[split.train_index[: models.WHITEN_SAMPLE_IMAGES]])
    model = models.build_model(config.architecture, classes, config.image_size, precision, calibration,
                               width=config.network_width)  # fmt: skip
    trainer = with_augmentation(model, config, len(batches))  # the random layers run inside the compiled step
    trainer.compile(
        optimizer=make_optimizer(config, steps, model, precision),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    history = trainer.fit(batches, epochs=config.epochs, verbose=0)
    fit_seconds = time.perf_counter() - started
    serving = to_serving_model(model, replace(config), classes, calibration)
    probabilities = serving.predict(np.asarray(arrays.x_test), batch_size=1000, verbose=0)
    return {
        "data": data_root.name,
        "profile": profile,
        "precision": precision,
        "bn_epsilon": bn_epsilon,
        "epochs": config.epochs,
        "test_accuracy": round(float((probabilities.argmax(1) == np.asarray(arrays.y_test)).mean()), 4),
        "final_train_loss": round(float(history.history["loss"][-1]), 4),
        "final_train_accuracy": round(float(history.history["accuracy"][-1]), 4),
        "fit_seconds": round(fit_seconds, 1),
        "backend": keras.backend.backend(),
        "device": _device(),
    }


def _device() -> str:
    try:
        import jax

        return str(jax.devices()[0].device_kind)
    except ImportError:
        return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default=os.environ.get("CIFAR10_DIR", str(REPO.parent / "shared/datasets/cifar10")))
    parser.add_argument("--runs", required=True, help="comma-separated DATA:PROFILE:PRECISION:BN_EPSILON[:EPOCHS]")
    parser.add_argument("--out", default=None, help="also append each run's JSON line to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        from tests.synthetic import write_digits_dataset

        roots = {"cifar": Path(args.cifar)}
        for spec in args.runs.split(","):
            data, profile, precision, epsilon, *epochs = spec.split(":")
            if data == "digits" and "digits" not in roots:
                roots["digits"] = write_digits_dataset(Path(scratch) / "digits")
            result = run(roots[data], Path(scratch) / "artifacts", profile, precision, float(epsilon),
                         int(epochs[0]) if epochs else None)  # fmt: skip
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")


if __name__ == "__main__":
    main()
