"""The training recipe under Keras' JAX backend, on machines without TensorFlow or Prefect (the lent GPU).

    KERAS_BACKEND=jax python bench/train_jax.py --cifar ../shared/datasets/cifar10 \
        --runs cifar:default:float32:1e-5,cifar:default:mixed_bfloat16:1e-3,digits:smoke:mixed_bfloat16:1e-3:10

Each run is DATA:PROFILE:PRECISION:BN_EPSILON[:EPOCHS], DATA `cifar` (the folder given by --cifar)
or `digits` (scikit-learn's digits written as 8x8 greyscale PNGs, as the tests do); `--set` overrides
config fields for every run, over the spec's (`--set network_width=1.5 --set tta_translate=true`).

`--mode train` (for timings to report) runs `model_lib.train.train`, the training step of `train-cifar`
itself: its validation, checkpoints, epoch log and callbacks, then scores the saved serving model (its
TTA) on the test set; `--per-step-sync` adds a callback that reads every step's loss in line, as the
loop's own callbacks did before they moved off the step. `--mode fit` is the bare recipe: ingest, the
in-memory batches with augmentation inside the compiled step, model, optimiser and schedule, `fit`
without validation or callbacks, and the serving model. Prints one JSON line per run (and appends it
to --out). JAX's persistent compilation cache is model_lib's (JAX_COMPILATION_CACHE_DIR moves it), so
a second process on the machine starts warm; `--artifacts` keeps the ingest cache between processes.
`--crops 0,4:24` runs each spec twice in `--mode fit`: on whole images, then with its first 4 epochs
on 24-pixel windows (progressive resizing: a conv step costs about the pixels it sees). It runs on
TensorFlow too (CPU figures, side by side in one process).
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


def run(mode: str, data_root: Path, artifacts: Path, profile: str, precision: str, bn_epsilon: float,
        epochs: int | None, overrides: dict, per_step_sync: bool,
        crop: tuple[int, int] | None = None) -> dict:  # fmt: skip
    import keras

    from model_lib import models
    from model_lib.config import resolve_config
    from model_lib.data import ingest, load_arrays

    models.AIRBENCH_BN_EPSILON = bn_epsilon
    config = resolve_config(profile, **{"data": str(data_root), "precision": precision, "epochs": epochs, **overrides})
    started = time.perf_counter()
    dataset = ingest(config.data, artifacts, config.image_size, config.max_train_images, config.max_test_images,
                     log=lambda m: None)  # fmt: skip
    ingest_seconds = time.perf_counter() - started
    config = config.at_size(dataset.image_shape[0])
    arrays = load_arrays(dataset.cache_dir)
    if mode == "train":
        trained = _train(config, dataset, arrays, artifacts, per_step_sync)
    else:
        trained = _fit(config, dataset, arrays, artifacts, per_step_sync, crop)
    probabilities = trained.pop("serving").predict(np.asarray(arrays.x_test), batch_size=1000, verbose=0)
    return {
        "mode": mode,
        "data": data_root.name,
        "profile": profile,
        "overrides": overrides,
        "per_step_sync": per_step_sync,
        "crop": crop,
        "bn_epsilon": bn_epsilon,
        "epochs": config.epochs,
        "test_accuracy": round(float((probabilities.argmax(1) == np.asarray(arrays.y_test)).mean()), 4),
        **trained,
        "ingest_seconds": round(ingest_seconds, 1),
        "backend": keras.backend.backend(),
        "device": _device(),
    }


def _train(config, dataset, arrays, artifacts: Path, per_step_sync: bool) -> dict:
    """`train-cifar`'s training step on a fresh run folder: the saved serving model and the step's times."""
    import keras

    from model_lib.preprocess import prepare_split
    from model_lib.runs import read_history
    from model_lib.train import train

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=artifacts))
    prepared = prepare_split(dataset.cache_dir, dataset.class_names, config, run_dir)
    extra = (keras.callbacks.TerminateOnNaN(),) if per_step_sync else ()  # its batch hook runs in line
    started = time.perf_counter()
    result = train(config, dataset, Path(prepared.split_path), run_dir, log=lambda m: None, extra_callbacks=extra)
    train_call_seconds = time.perf_counter() - started
    epoch_seconds = read_history(Path(result.history_path))["epoch_seconds"].tolist()
    return {
        "precision": result.precision,
        "serving": keras.saving.load_model(result.model_path, safe_mode=True),
        "train_seconds": round(result.train_seconds, 1),  # the epochs, their validation and checkpoints
        "train_call_seconds": round(train_call_seconds, 1),  # also building, whitening, checks and saving
        "epoch_seconds": [round(seconds, 2) for seconds in epoch_seconds],
    }


def _fit(config, dataset, arrays, artifacts: Path, per_step_sync: bool, crop: tuple[int, int] | None = None) -> dict:
    """The recipe's bare `fit` (no validation, checkpoints or callbacks) and its serving model.

    With `crop` (EPOCHS, SIDE), the first EPOCHS epochs train on a per-image random SIDE x SIDE window
    of each augmented image (a translation by up to the margin, then the centre), the rest on whole
    images: the same optimiser, schedule and alternating mirror throughout. airbench's network ends in
    a global max pool, so it takes any side; a conv step costs about the pixels it sees.
    """
    import keras
    from keras import layers

    from model_lib import models
    from model_lib.precision import choose_precision, cpu_bf16_units, devices, release_devices
    from model_lib.preprocess import make_datasets, random_translation, with_augmentation
    from model_lib.recipe import make_optimizer
    from model_lib.split import stratified_split
    from model_lib.train import to_serving_model

    _, _, capabilities = devices()  # also JAX's persistent compilation cache, as training sets it
    precision, _ = choose_precision(config.precision, capabilities, cpu_bf16_units())
    split = stratified_split(np.asarray(arrays.y_train), config.validation_split, config.seed)
    classes = len(dataset.class_names)
    keras.utils.set_random_seed(config.seed)

    batches, _ = make_datasets(arrays.x_train, arrays.y_train, split, classes, config)  # training's pipeline
    steps = config.epochs * len(batches)
    calibration = np.asarray(arrays.x_train[split.train_index[: models.WHITEN_SAMPLE_IMAGES]])
    model = models.build_model(config.architecture, classes, None if crop else config.image_size, precision,
                               calibration, width=config.network_width)  # fmt: skip
    trainer = with_augmentation(model, config, len(batches))  # the random layers run inside the compiled step
    optimizer = make_optimizer(config, steps, model, precision)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    stages = [(trainer, config.epochs)]
    if crop:
        crop_epochs, side = crop
        margin = (config.image_size - side) / 2 / config.image_size
        cropped = keras.Sequential([
            keras.Input((config.image_size, config.image_size, 3)),
            random_translation(margin, config.seed + 4),
            layers.CenterCrop(side, side),
            trainer,
        ], name="cropped")  # fmt: skip
        stages = [(cropped, min(crop_epochs, config.epochs)), (trainer, config.epochs)]
    callbacks = [keras.callbacks.TerminateOnNaN()] if per_step_sync else []
    started, first_epoch, stage_seconds = time.perf_counter(), 0, []
    for stage, last_epoch in stages:  # one optimiser: its step count carries the schedule across stages
        if last_epoch <= first_epoch:
            continue
        stage.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
        stage_started = time.perf_counter()
        history = stage.fit(batches, initial_epoch=first_epoch, epochs=last_epoch, verbose=0, callbacks=callbacks)
        stage_seconds.append(round(time.perf_counter() - stage_started, 1))
        first_epoch = last_epoch
    fit_seconds = time.perf_counter() - started
    release_devices()
    return {
        "precision": precision,
        "serving": to_serving_model(model, replace(config), classes, calibration),
        "final_train_loss": round(float(history.history["loss"][-1]), 4),
        "fit_seconds": round(fit_seconds, 1),
        "stage_seconds": stage_seconds,
    }


def _device() -> str:
    try:
        import jax

        return str(jax.devices()[0].device_kind)
    except ImportError:
        return "cpu"


def parse_override(text: str) -> tuple[str, object]:
    """`field=value` as a config override, the value read as JSON where it parses (1.5, true) else kept as text."""
    field, _, value = text.partition("=")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def _crops(text: str) -> list[tuple[int, int] | None]:
    """`0,4:24` as [None (whole images throughout), (4, 24)]."""
    crops = []
    for item in text.split(","):
        epochs, _, side = item.partition(":")
        crops.append((int(epochs), int(side)) if int(epochs) else None)
    return crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default=os.environ.get("CIFAR10_DIR", str(REPO.parent / "shared/datasets/cifar10")))
    parser.add_argument("--runs", required=True, help="comma-separated DATA:PROFILE:PRECISION:BN_EPSILON[:EPOCHS]")
    parser.add_argument("--mode", choices=("fit", "train"), default="fit")
    parser.add_argument("--set", action="append", default=[], type=parse_override, help="FIELD=VALUE config override")
    parser.add_argument("--per-step-sync", action="store_true", help="read each step's loss in line (the old cost)")
    parser.add_argument(
        "--crops",
        default=[None],
        type=_crops,
        help="run each spec once per EPOCHS:SIDE (the first EPOCHS on SIDE-pixel windows; 0: none)",
    )
    parser.add_argument("--artifacts", default=None, help="keep the ingest cache here (default: a scratch folder)")
    parser.add_argument("--out", default=None, help="also append each run's JSON line to this file")
    args = parser.parse_args()
    if args.mode == "train" and any(args.crops):
        parser.error("--crops applies to --mode fit only")

    with tempfile.TemporaryDirectory() as scratch:
        from tests.synthetic import write_digits_dataset

        artifacts = Path(args.artifacts or Path(scratch) / "artifacts")
        artifacts.mkdir(parents=True, exist_ok=True)
        roots = {"cifar": Path(args.cifar)}
        for spec, crop in ((spec, crop) for spec in args.runs.split(",") for crop in args.crops):
            data, profile, precision, epsilon, *epochs = spec.split(":")
            if data == "digits" and "digits" not in roots:
                roots["digits"] = write_digits_dataset(Path(scratch) / "digits")
            result = run(args.mode, roots[data], artifacts, profile, precision, float(epsilon),
                         int(epochs[0]) if epochs else None, dict(args.set), args.per_step_sync, crop)  # fmt: skip
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")


if __name__ == "__main__":
    main()
