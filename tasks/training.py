"""The train-cifar tasks: ingest -> preprocess -> data-report -> train -> calibrate -> evaluate (and
evaluate-champion, the current champion on the same test images) -> plot -> register.

Tasks hand each other typed results (`DatasetInfo`, `PreparedSplit`, `TrainResult`); the records
that are also written as JSON (gates, calibration, metrics) stay dicts.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from model_lib.calibrate import CALIBRATION_FILE, calibrate_run
from model_lib.checks import check_evaluation_memory
from model_lib.config import TrainConfig
from model_lib.data import DatasetInfo, ingest, load_file_table
from model_lib.data_report import (
    DATA_REPORT_FILE,
    DATA_REPORT_MARKDOWN,
    FILES_FILE,
    build_report,
    check_gates,
    data_report_markdown,
    load_previous,
    write_report,
)
from model_lib.evaluate import evaluate_run, score_model
from model_lib.gate import champion_scores
from model_lib.ood import OOD_FILE
from model_lib.plots import plot_run
from model_lib.preprocess import PreparedSplit, prepare_split
from model_lib.registry import Registry, attach_to_version
from model_lib.report import REPORT_FILE, RunRecord, build_manifest, report_markdown
from model_lib.runs import (
    CONFIG_FILE,
    CONFUSION_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PER_CLASS_FILE,
    PLOT_FILES,
    PROBE_FILE,
    PRUNING_FILE,
    TEST_PROBABILITIES,
    TrainResult,
    claim_run_dir,
    release_run_dir,
)
from model_lib.settings import artifacts_location, work_dir
from model_lib.train import train
from model_lib.versions import ChecksumError, load_verified_model
from tasks.common import log_info, log_warning, retry_on_transient_io

RUN_FILES = (
    CONFIG_FILE, HISTORY_FILE, METRICS_FILE, PER_CLASS_FILE, CONFUSION_FILE, *PLOT_FILES.values(), CALIBRATION_FILE,
    DATA_REPORT_FILE, DATA_REPORT_MARKDOWN, FILES_FILE, OOD_FILE, PRUNING_FILE,
)  # fmt: skip


@task(name="ingest", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_transient_io)
def ingest_task(config: dict) -> DatasetInfo:
    """Decode the dataset once into the content-addressed cache; later runs load the cache."""
    cfg = TrainConfig(**config)

    def affordable(side: int, train: int, test: int) -> None:
        check_evaluation_memory(side, test + round(train * cfg.validation_split))

    info = ingest(
        cfg.data, work_dir(), cfg.image_size, cfg.max_train_images, cfg.max_test_images, cfg.skip_corrupt,
        log=log_info, check_size=affordable,
    )  # fmt: skip
    return info


@task(name="preprocess")
def preprocess_task(config: dict, dataset: DatasetInfo) -> PreparedSplit:
    """Seeded stratified split into this run's folder (same config + data = same folder, to resume;
    a fresh one while an identical run is alive).

    Also reads the registry the run will register into, so a corrupt one stops the run now, not
    after training.
    """
    cfg = TrainConfig(**config)
    Registry(artifacts_location(), cfg.model_name).state()
    run_dir = claim_run_dir(work_dir() / "runs", cfg.run_key(dataset.fingerprint))
    prepared = prepare_split(dataset.cache_dir, dataset.class_names, cfg, run_dir)
    log_info(
        f"Split {prepared.train_count} train / {prepared.validation_count} validation / "
        f"{prepared.test_count} test images into {run_dir}"
    )
    return prepared


@task(name="data-report")
def data_report_task(config: dict, dataset: DatasetInfo, run_dir: str) -> dict:
    """Report on the data (counts, changes since the previous version, duplicates, leakage, sizes) and
    check its gates before any training; publishes the report as a Markdown artifact.

    Returns:
        The gates' verdict: `passed`, `failures`, `warnings`, `thresholds`.

    Raises:
        DataGateError: A gate failed (leakage, a too-small class, a vanished class).
    """
    cfg = TrainConfig(**config)
    files = load_file_table(dataset.cache_dir)
    registry = Registry(artifacts_location(), cfg.model_name)
    latest = registry.state()["aliases"]["latest"]
    previous = load_previous(latest, registry.version_dir(latest)) if latest else None
    report = build_report(files, dataset.class_names, dataset.skipped_files, previous, cfg)
    write_report(report, files, Path(run_dir))
    for warning in report["gates"]["warnings"]:
        log_warning(f"Data: {warning}")
    verdict = "passed" if report["gates"]["passed"] else "failed"
    create_markdown_artifact(
        key=artifact_key(cfg.model_name, "data-report"),
        markdown=data_report_markdown(report),
        description=f"{cfg.model_name}: data gates {verdict}",
    )
    check_gates(report)
    log_info(f"Data gates passed ({len(report['gates']['warnings'])} warning(s)); report in {run_dir}")
    return report["gates"]


def artifact_key(model_name: str, kind: str) -> str:
    """A Prefect artifact key per model name (keys allow lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model_name.lower()}-{kind}").strip("-")


@task(name="train")
def train_task(config: dict, dataset: DatasetInfo, prepared: PreparedSplit, time_limit: float) -> TrainResult:
    """Train (GPU when present), checkpointing every epoch; resumes an interrupted identical run. Stops with
    `TrainingTimeout` at the first step after `time_limit` seconds."""
    return train(TrainConfig(**config), dataset, Path(prepared.split_path), Path(prepared.run_dir), log=log_info,
                 time_limit=time_limit)  # fmt: skip


@task(name="calibrate")
def calibrate_task(trained: TrainResult, dataset: DatasetInfo, prepared: PreparedSplit) -> dict:
    """Fit a temperature on the validation split and fold it into the saved model; choose the unsure flags' rules.

    Returns:
        The calibration record: temperature, test ECE and NLL before and after, the flags' thresholds.
    """
    record = calibrate_run(
        trained.model_path, trained.probe_path, dataset.cache_dir, prepared.split_path, Path(trained.run_dir)
    )
    log_info(
        f"Calibrated: temperature {record['temperature']:.3f} ({record['fitted_on']}); test ECE "
        f"{record['test_ece_before']:.4f} -> {record['test_ece_after']:.4f}, NLL {record['test_nll_before']:.4f} -> "
        f"{record['test_nll_after']:.4f}"
    )
    if cascade := record.get("cascade"):
        verdict = "served by --engine auto" if cascade["serves"] else "not served: it loses more than 0.2 points"
        log_info(
            f"First view first, every view for the {cascade['every_view_share']:.1%} it leaves unsure: test accuracy "
            f"{cascade['test_accuracy']:.4f} (every view {cascade['test_accuracy_every_view']:.4f}), ECE "
            f"{cascade['test_ece']:.4f}; {verdict}"
        )
    return record


@task(name="evaluate")
def evaluate_task(trained: TrainResult, dataset: DatasetInfo, learned_margin: float) -> dict:
    """Test accuracy and loss, per-class precision/recall/F1 and the confusion matrix (JSON and CSV).

    Fails the run when the model is no better than answering the most common class.
    """
    scored = Path(trained.run_dir) / TEST_PROBABILITIES  # calibration's, for the model it saved
    metrics = evaluate_run(
        trained.model_path, dataset.cache_dir, dataset.class_names, Path(trained.run_dir), learned_margin,
        scored=str(scored) if scored.is_file() else None,
    )  # fmt: skip
    log_info(f"Test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f}")
    return metrics


@task(name="evaluate-champion", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_transient_io)
def evaluate_champion_task(config: dict, dataset: DatasetInfo, test_fingerprint: str) -> dict | None:
    """Score the current champion on this run's test set, so the gate compares both on the same images.

    A champion that takes another image size than this run's is scored on the same files decoded at its own
    size (ingested once more, from the cache after the first time).

    The score is stored in the registry under the test set's fingerprint and reused, never
    recomputed. Nothing is scored when there is no champion or its classes differ from the data's
    (the gate then leaves the decision to the operator).

    Returns:
        `version`, `accuracy` and `recomputed`, or None when nothing was scored.
    """
    model_name = config["model_name"]
    registry = Registry(artifacts_location(), model_name)
    state = registry.state()
    champion = state["aliases"]["champion"]
    if champion is None:
        log_info(f"{model_name} has no champion yet: nothing to compare with")
        return None
    entry = next(e for e in state["versions"] if e["version"] == champion)
    if entry.get("class_names") not in (None, dataset.class_names):
        log_info(f"Champion v{champion} has other classes than this data: not scored (the gate will say why)")
        return None
    known = champion_scores(entry).get(test_fingerprint)
    if known is not None:
        log_info(f"Champion v{champion} already scored {known:.4f} on this test set ({test_fingerprint[:12]})")
        return {"version": champion, "accuracy": known, "recomputed": False}
    try:
        model = load_verified_model(registry.version_dir(champion))
    except ChecksumError as error:  # never score (or serve) a tampered model; the gate will refuse to compare
        log_warning(f"Champion v{champion} not scored: {error}")
        return None
    side = model.input_shape[1]
    if side != dataset.image_shape[0]:
        log_info(f"Champion v{champion} takes {side}-px images: the test images are decoded at that size for it")
        dataset = ingest_task.fn({**config, "image_size": side})
    metrics, _ = score_model(model, dataset.cache_dir, dataset.class_names)
    score = {"accuracy": metrics["test_accuracy"], "loss": metrics["test_loss"], "count": metrics["test_count"]}
    registry.record_score(champion, test_fingerprint, score)
    log_info(
        f"Champion v{champion} scores {score['accuracy']:.4f} on this run's test set ({test_fingerprint[:12]}, "
        f"{score['count']} images)"
    )
    return {"version": champion, "accuracy": score["accuracy"], "recomputed": True}


@task(name="plot")
def plot_task(trained: TrainResult, dataset: DatasetInfo, seed: int) -> dict:
    """Training curves, confusion-matrix heat map and sample predictions (PNG)."""
    return plot_run(Path(trained.run_dir), dataset.cache_dir, dataset.class_names, seed)


@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_transient_io)
def register_task(run: RunRecord, margin: float = 0.0) -> dict:
    """Register the model with its metrics, plots, TensorBoard logs and lineage; add its report.md; publish
    the report (plots embedded) and the per-class table as Prefect artifacts named after the model."""
    import keras

    config, trained, metrics = run.config, run.trained, run.metrics
    run_dir = Path(trained.run_dir)
    files = {MODEL_FILE: trained.model_path, PROBE_FILE: trained.probe_path}
    files |= {name: run_dir / name for name in RUN_FILES if (run_dir / name).is_file()}
    files |= {path.relative_to(run_dir).as_posix(): path for path in sorted((run_dir / "tensorboard").rglob("*"))
              if path.is_file()}  # fmt: skip
    model = keras.saving.load_model(trained.model_path, safe_mode=True)
    run_id = str(flow_run.id) if flow_run.id else None
    manifest = build_manifest(run, model, run_id)
    registration = Registry(artifacts_location(), config["model_name"]).register(files, manifest, margin=margin)
    release_run_dir(run_dir)
    version_dir = Path(registration.path)
    fields = (registration.name, registration.version, registration.champion, registration.reason, manifest)
    (run_dir / REPORT_FILE).write_text(report_markdown(*fields, version_dir), encoding="utf-8")
    attach_to_version(version_dir, {REPORT_FILE: run_dir / REPORT_FILE}, "report", [{"file": REPORT_FILE}])
    verdict = "became champion" if registration.champion else "stays a challenger"
    log_info(f"Registered {registration.name} v{registration.version}: {verdict} ({registration.reason})")
    create_markdown_artifact(
        key=artifact_key(registration.name, "report"),
        markdown=report_markdown(*fields, version_dir, embed=True),
        description=f"{registration.name} v{registration.version}: test accuracy {metrics['test_accuracy']:.4f}",
    )
    create_table_artifact(
        key=artifact_key(registration.name, "per-class"),
        table=metrics["per_class"],
        description=f"{registration.name} v{registration.version}: per-class precision, recall and F1 on the test set",
    )
    return {
        "name": registration.name,
        "version": registration.version,
        "path": registration.path,
        "location": registration.location,
        "champion": registration.champion,
        "reason": registration.reason,
        "test_accuracy": metrics["test_accuracy"],
    }
