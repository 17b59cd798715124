"""The `train-cifar` flow: ingest -> preprocess/augment -> train -> evaluate -> plot -> register."""

from __future__ import annotations

from prefect import flow

from model_lib.checks import check_training_request
from model_lib.data import suggested_model_name
from model_lib.settings import artifacts_dir
from tasks.export import export_task
from tasks.training import evaluate_task, ingest_task, plot_task, preprocess_task, register_task, train_task


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
    promotion_margin: float = 0.0,
    export: bool = False,
) -> dict:
    """Train a model on a profile (plus overrides) and register it; returns the registration.

    `data` defaults to `CIFAR10_DIR`, else Keras' download. `model_name` defaults to cifar10 for
    CIFAR-10's classes, else the data folder's name. `learned_margin` is the accuracy a run must
    add to the majority-class rate (validation and test) to be registered at all.
    `promotion_margin` is the test accuracy a new version must add to the champion's to replace it.
    `weights`, `head_epochs` and `fine_tune_learning_rate` apply to the `transfer` architecture.
    `export` adds TFLite exports.
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
    )
    config = check_training_request(profile, overrides, artifacts_dir()).to_dict()
    dataset = ingest_task(config)
    config["model_name"] = config["model_name"] or suggested_model_name(dataset["source"], dataset["class_names"])
    prepared = preprocess_task(config, dataset)
    trained = train_task(config, dataset, prepared)
    metrics = evaluate_task(trained, dataset, config["learned_margin"])
    plot_task(trained, dataset, config["seed"])
    registration = register_task(config, dataset, prepared, trained, metrics, promotion_margin)
    if export:
        registration["exports"] = export_task(registration["path"])
    return registration
