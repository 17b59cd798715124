"""The `train-cifar` flow: ingest -> split -> data report and gates -> train -> evaluate (and re-score the
champion on the same test set) -> plot -> register; calibration folds a temperature into the model after
training."""

from __future__ import annotations

from prefect import flow
from prefect.task_engine import TaskRunTimeoutError

from flows.surfaces import flow_parameters
from model_lib.checks import check_training_request
from model_lib.config import TrainConfig, check_run_limits, training_timeout_minutes
from model_lib.data import DatasetInfo
from model_lib.export import require_tensorflow_backend
from model_lib.fileio import read_json
from model_lib.registry import Registry
from model_lib.report import RunRecord
from model_lib.requests import TRAIN_REQUEST, parameter_names, training_overrides, with_defaults
from model_lib.settings import artifacts_location
from model_lib.sources import suggested_model_name
from model_lib.train import TrainingTimeout
from model_lib.versions import MANIFEST_FILE
from tasks.common import KEPT_RESULTS, check_deployment_storage, finished, in_parameter_words
from tasks.export import export_task
from tasks.pruning import measure_pruning_task
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

# Prefect's timeout on the training task, after the run's own limit: it ends a step stuck where training's own check
# never runs (in C++), which the limit cannot.
TIMEOUT_BACKSTOP_SECONDS = 120


@flow(name="train-cifar", **KEPT_RESULTS)
@in_parameter_words(parameter_names(TRAIN_REQUEST))
@flow_parameters(TRAIN_REQUEST)
def train_cifar(**request) -> dict:
    """Train a model on a profile (plus overrides) and register it; returns the registration.

    The run's final state says the outcome in its message ("registered cifar10 v7, champion", the
    challenger's reason, or "skipped: ..."), so the run list shows it without opening the run.

    Every override left empty takes the profile's value (see the README's profile table).
    """
    request = with_defaults(TRAIN_REQUEST, request)
    timeout_minutes, promotion_margin = request["timeout_minutes"], request["promotion_margin"]
    check_deployment_storage()
    config = check_training_request(request["profile"], training_overrides(request), artifacts_location()).to_dict()
    check_run_limits(timeout_minutes, promotion_margin)
    if request["export"]:
        require_tensorflow_backend()  # before training, not after
    dataset = ingest_task(config)
    config = TrainConfig(**config).at_size(dataset.image_shape[0]).to_dict()  # auto: the side ingest chose
    config["model_name"] = config["model_name"] or suggested_model_name(dataset.source, dataset.class_names)
    if request["skip_unchanged"] and (same := latest_with_run_key(config, dataset.fingerprint)):
        why = f"v{same} was trained on this config and data"
        # The state's message says the outcome in the UI's run list; the caller gets the data.
        return finished(f"skipped: {config['model_name']} {why}", {"name": config["model_name"], "skipped": why})
    registration = train_and_register(config, dataset, timeout_minutes, promotion_margin, request["export"])
    return finished(outcome(registration), registration)


def train_and_register(
    config: dict, dataset: DatasetInfo, timeout_minutes: float | None, promotion_margin: float, export: bool
) -> dict:
    """The steps of a training run after ingest, inside the calling flow (train-cifar, prune-version): split ->
    data report and gates -> train -> calibrate -> evaluate (and re-score the champion) -> plot -> register
    (-> export). Returns the registration."""
    prepared = preprocess_task(config, dataset)
    gates = data_report_task(config, dataset, prepared.run_dir)
    limit = timeout_minutes or training_timeout_minutes(TrainConfig(**config))
    # Training stops itself at the limit; Prefect's timeout, later, ends a step stuck where no check runs.
    backstop = train_task.with_options(timeout_seconds=limit * 60 + TIMEOUT_BACKSTOP_SECONDS)
    try:
        trained = backstop(config, dataset, prepared, time_limit=limit * 60)
    except (TrainingTimeout, TaskRunTimeoutError) as error:
        raise TrainingTimeout(
            f"training ran past its time limit of {limit:g} min and was stopped; nothing was registered "
            "(a longer --timeout-minutes, or the same command again resumes from the last epoch)"
        ) from error
    calibration = calibrate_task(trained, dataset, prepared)
    metrics = evaluate_task(trained, dataset, config["learned_margin"])
    evaluate_champion_task(config, dataset, prepared.test_fingerprint)
    plot_task(trained, dataset, config["seed"])
    if config.get("pruned"):  # prune-version: its speed beside the parent's, and the family's plot
        measure_pruning_task(trained, dataset, config, metrics["test_accuracy"])
    run = RunRecord(config, dataset, prepared, trained, metrics, gates, calibration)
    registration = register_task(run, promotion_margin)
    if export:
        registration["exports"] = export_task(registration["path"])
    return registration


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
