"""The `train-cifar` flow: ingest -> split -> data report and gates -> train -> evaluate (and re-score the
champion on the same test set) -> plot -> register; calibration folds a temperature into the model after
training."""

from __future__ import annotations

from prefect import flow, get_run_logger

from model_lib.checks import check_training_request
from model_lib.config import TrainConfig
from model_lib.data import suggested_model_name
from model_lib.fileio import read_json
from model_lib.registry import MANIFEST_FILE, Registry
from model_lib.settings import artifacts_dir
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


@flow(name="train-cifar")
def train_cifar(
    profile: str = "default",
    architecture: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    data: str | None = None,
    seed: int | None = None,
    precision: str | None = None,
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
    promotion_margin: float = 0.0,
    export: bool = False,
    skip_unchanged: bool = False,
) -> dict:
    """Train a model on a profile (plus overrides) and register it; returns the registration.

    `data` defaults to `CIFAR10_DIR`, else Keras' download. `model_name` defaults to cifar10 for
    CIFAR-10's classes, else the data folder's name. `learned_margin` is the accuracy a run must
    add to the majority-class rate (validation and test) to be registered at all.
    `promotion_margin` is the test accuracy a new version must add to the champion's to replace it.
    `weights`, `head_epochs` and `fine_tune_learning_rate` apply to the `transfer` architecture.
    `max_leakage`, `min_class_images`, `allow_class_change` and `balance_shift_warning` set the
    data gates checked before training. `export` adds TFLite exports. `skip_unchanged` ends the run
    without training when the latest registered version came from the same config and data (set by
    the data trigger, so a burst of events or a queued duplicate never trains twice).
    """
    overrides = dict(
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        data=data,
        seed=seed,
        precision=precision,
        validation_split=validation_split,
        max_train_images=max_train_images,
        max_test_images=max_test_images,
        skip_corrupt=skip_corrupt,
        model_name=model_name,
        weights=weights,
        head_epochs=head_epochs,
        fine_tune_learning_rate=fine_tune_learning_rate,
        learned_margin=learned_margin,
        max_leakage=max_leakage,
        min_class_images=min_class_images,
        allow_class_change=allow_class_change,
        balance_shift_warning=balance_shift_warning,
    )
    config = check_training_request(profile, overrides, artifacts_dir()).to_dict()
    dataset = ingest_task(config)
    config["model_name"] = config["model_name"] or suggested_model_name(dataset["source"], dataset["class_names"])
    if skip_unchanged and (same := latest_with_run_key(config, dataset["fingerprint"])):
        get_run_logger().info(f"Nothing to do: {config['model_name']} v{same} was trained on this config and data")
        return {"name": config["model_name"], "skipped": f"v{same} was trained on this config and data"}
    prepared = preprocess_task(config, dataset)
    gates = data_report_task(config, dataset, prepared["run_dir"])
    trained = train_task(config, dataset, prepared)
    calibration = calibrate_task(trained, dataset, prepared)
    metrics = evaluate_task(trained, dataset, config["learned_margin"])
    evaluate_champion_task(config["model_name"], dataset, prepared["test_fingerprint"])
    plot_task(trained, dataset, config["seed"])
    registration = register_task(config, dataset, prepared, trained, metrics, gates, calibration, promotion_margin)
    if export:
        registration["exports"] = export_task(registration["path"])
    return registration


def latest_with_run_key(config: dict, dataset_fingerprint: str) -> int | None:
    """The latest registered version when it was trained on exactly this config and data, else None."""
    registry = Registry(artifacts_dir(), config["model_name"])
    latest = registry.state()["aliases"]["latest"]
    if latest is None:
        return None
    manifest = read_json(registry.version_dir(latest) / MANIFEST_FILE)
    return latest if manifest.get("run_key") == TrainConfig(**config).run_key(dataset_fingerprint) else None
