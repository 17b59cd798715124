"""The `train-cifar` flow: ingest -> split -> data report and gates -> train -> evaluate (and re-score the
champion on the same test set) -> plot -> register; calibration folds a temperature into the model after
training."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.task_engine import TaskRunTimeoutError

from model_lib.checks import check_training_request
from model_lib.config import (
    CHOICES,
    PROFILES,
    TrainConfig,
    check_run_limits,
    config_overrides,
    training_timeout_minutes,
)
from model_lib.export import require_tensorflow_backend
from model_lib.fileio import read_json
from model_lib.registry import Registry
from model_lib.report import RunRecord
from model_lib.settings import artifacts_location
from model_lib.sources import suggested_model_name
from model_lib.versions import MANIFEST_FILE
from tasks.common import KEPT_RESULTS, check_deployment_storage, finished, in_parameter_words
from tasks.export import export_task
from tasks.training import (
    calibrate_task,
    data_report_task,
    evaluate_champion_task,
    evaluate_task,
    ingest_task,
    plot_task,
    preprocess_task,
    register_task,
    train_task,
)

Profile = Literal[tuple(PROFILES)]
Architecture = Literal[CHOICES["architecture"]]
Precision = Literal[CHOICES["precision"]]
Optimizer = Literal[CHOICES["optimizer"]]
JitCompile = Literal[CHOICES["jit_compile"]]


@flow(name="train-cifar", **KEPT_RESULTS)
@in_parameter_words()
def train_cifar(
    profile: Profile = "default",
    architecture: Architecture | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    data: str | None = None,
    seed: int | None = None,
    precision: Precision | None = None,
    optimizer: Optimizer | None = None,
    network_width: float | None = None,
    image_size: int | Literal["auto"] | None = None,
    label_smoothing: float | None = None,
    jit_compile: JitCompile | None = None,
    validation_split: float | None = None,
    max_train_images: int | None = None,
    max_test_images: int | None = None,
    skip_corrupt: bool | None = None,
    model_name: str | None = None,
    weights: str | None = None,
    head_epochs: int | None = None,
    fine_tune_learning_rate: float | None = None,
    learned_margin: float | None = None,
    max_leakage: float | None = None,
    min_class_images: int | None = None,
    allow_class_change: bool | None = None,
    balance_shift_warning: float | None = None,
    deterministic: bool | None = None,
    tta_translate: bool | None = None,
    promotion_margin: float = 0.0,
    export: bool = False,
    skip_unchanged: bool = False,
    timeout_minutes: float | None = None,
) -> dict:
    """Train a model on a profile (plus overrides) and register it; returns the registration.

    The run's final state says the outcome in its message ("registered cifar10 v7, champion", the
    challenger's reason, or "skipped: ..."), so the run list shows it without opening the run.

    Every override left empty takes the profile's value (see the README's profile table).

    Args:
        profile: The recipe to start from: default (airbench94_muon: 8 epochs, about 12-35 min on 2 CPU
            cores), gpu (default at twice the width for 12 epochs, for GPUs), airbench94 (10 epochs), fast,
            seed (the origin notebook's) or smoke (a minute, for checks).
        architecture: The network: airbench, seed_cnn or transfer (MobileNetV3Small backbone).
        epochs: Passes over the training split.
        batch_size: Images per optimiser step (with SGD the learning rate scales with it, Muon's step
            with its square root).
        learning_rate: Peak learning rate per step.
        data: Image folder (train/<class>/, test/<class>/), cifar-10-batches-py folder, or keras
            (download); empty means CIFAR10_DIR, else keras.
        seed: Seeds the split, weights, shuffling and augmentation.
        precision: auto (decided once per machine), float32, mixed_bfloat16 or mixed_float16.
        optimizer: sgd (Nesterov momentum), muon (sgd, but Muon on the conv kernels; airbench only) or adam.
        network_width: Multiplier on airbench's channel widths (64/256/256; gpu uses 2); compute grows
            about with its square.
        image_size: Pixels per side the model sees, or auto (the default): the largest of 32, 64, 96 and
            128 px at most the training images' median short side (CIFAR-10: 32).
        label_smoothing: Target mass spread uniformly over all classes.
        jit_compile: XLA compilation of the training step: auto (GPUs only), on or off.
        validation_split: Fraction of training images held out (stratified) for validation and
            calibration.
        max_train_images: Class-balanced cap on training images; empty means all.
        max_test_images: Class-balanced cap on test images; empty means all.
        skip_corrupt: Skip undecodable files (listed in the data report) instead of failing.
        model_name: Registry name; empty means cifar10 for CIFAR-10's classes, else the data folder's name.
        weights: transfer only: imagenet (downloads), a local weights file, or none.
        head_epochs: transfer only: epochs training the new head before fine-tuning.
        fine_tune_learning_rate: transfer only: constant learning rate while fine-tuning.
        learned_margin: Accuracy a run must add to the majority-class rate (validation and test)
            to be registered, and a version to become champion (default 0.05).
        max_leakage: Data gate: fraction of test images allowed to be exact copies of training
            images (default 0).
        min_class_images: Data gate: training images every class needs (default 10).
        allow_class_change: Data gate: let a class of the previous registered version vanish.
        balance_shift_warning: Warn when the class shares moved more than this since the previous
            version (total variation distance, default 0.1).
        deterministic: TensorFlow op determinism and serial augmentation: the same model on every run of
            the same config, seed, data and machine.
        tta_translate: Serve with airbench's mirror-plus-translate test-time augmentation (the image and
            its mirror, plus both seen through a window moved one pixel up-left and down-right: six
            views, three times flip TTA's prediction time; on in default) instead of flip TTA.
        promotion_margin: Test accuracy a new version must add to the champion's (on the same test
            images) to replace it.
        export: Also write TFLite float32, float16 and int8 exports beside the version.
        skip_unchanged: End at once when the latest version came from the same config and data
            (set by the data trigger, so a queued duplicate never trains twice).
        timeout_minutes: Fail the training task after this long; empty means 4 times the profile's
            slowest 2-core CPU time (scaled by epochs), at least 30 minutes.
    """
    overrides = config_overrides(locals())  # every parameter named like a config field, declared once above
    check_deployment_storage()
    config = check_training_request(profile, overrides, artifacts_location()).to_dict()
    check_run_limits(timeout_minutes, promotion_margin)
    if export:
        require_tensorflow_backend()  # before training, not after
    dataset = ingest_task(config)
    config = TrainConfig(**config).at_size(dataset.image_shape[0]).to_dict()  # auto: the side ingest chose
    config["model_name"] = config["model_name"] or suggested_model_name(dataset.source, dataset.class_names)
    if skip_unchanged and (same := latest_with_run_key(config, dataset.fingerprint)):
        why = f"v{same} was trained on this config and data"
        # The state's message says the outcome in the UI's run list; the caller gets the data.
        return finished(f"skipped: {config['model_name']} {why}", {"name": config["model_name"], "skipped": why})
    prepared = preprocess_task(config, dataset)
    gates = data_report_task(config, dataset, prepared.run_dir)
    limit = timeout_minutes or training_timeout_minutes(TrainConfig(**config))
    try:
        trained = train_task.with_options(timeout_seconds=limit * 60)(config, dataset, prepared)
    except TaskRunTimeoutError as error:
        raise TrainingTimeout(
            f"training ran past its time limit of {limit:g} min and was stopped; nothing was registered "
            "(a longer --timeout-minutes, or the same command again resumes from the last epoch)"
        ) from error
    calibration = calibrate_task(trained, dataset, prepared)
    metrics = evaluate_task(trained, dataset, config["learned_margin"])
    evaluate_champion_task(config, dataset, prepared.test_fingerprint)
    plot_task(trained, dataset, config["seed"])
    run = RunRecord(config, dataset, prepared, trained, metrics, gates, calibration)
    registration = register_task(run, promotion_margin)
    if export:
        registration["exports"] = export_task(registration["path"])
    return finished(outcome(registration), registration)


class TrainingTimeout(RuntimeError):
    """The training task ran past the run's time limit."""


def outcome(registration: dict) -> str:
    """The run's outcome in one line, for its final state: "registered cifar10 v7, champion", or why not."""
    verdict = "champion" if registration["champion"] else f"challenger ({registration['reason']})"
    return f"registered {registration['name']} v{registration['version']}, {verdict}"


def latest_with_run_key(config: dict, dataset_fingerprint: str) -> int | None:
    """The latest registered version when it was trained on exactly this config and data, else None."""
    registry = Registry(artifacts_location(), config["model_name"])
    latest = registry.state()["aliases"]["latest"]
    if latest is None:
        return None
    manifest = read_json(registry.version_dir(latest) / MANIFEST_FILE)
    return latest if manifest.get("run_key") == TrainConfig(**config).run_key(dataset_fingerprint) else None
