"""A version's manifest fields and its Markdown report (`report.md` in the folder, and the Prefect artifact)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from model_lib.config import TrainConfig
from model_lib.data import DatasetInfo
from model_lib.lineage import code_revision, library_versions
from model_lib.preprocess import PreparedSplit
from model_lib.runs import PLOT_FILES, TrainResult

REPORT_FILE = "report.md"
PLOTS = {  # file -> caption, in the order the report shows them
    PLOT_FILES["curves"]: "training curves",
    PLOT_FILES["confusion"]: "confusion matrix",
    PLOT_FILES["reliability"]: "reliability before/after calibration",
    PLOT_FILES["samples"]: "sample predictions",
    PLOT_FILES["pruning"]: "accuracy against speed and size, beside the parent and its other pruned versions",
}


@dataclass(frozen=True)
class RunRecord:
    """Everything a trained, evaluated run hands to registration."""

    config: dict  # the run's TrainConfig as a dict
    dataset: DatasetInfo  # what ingest produced
    prepared: PreparedSplit  # the split's counts and test-set fingerprint
    trained: TrainResult  # the model's paths, and seconds, epochs, precision, device
    metrics: dict  # the evaluation's metrics, with the majority rate and promotion floor
    gates: dict  # the data gates' verdict
    calibration: dict  # the calibration record


def build_manifest(run: RunRecord, model, flow_run_id: str | None) -> dict:
    """The manifest fields of a trained, evaluated run (the registry adds version, date and checksums).

    Args:
        run: The run's results.
        model: The saved Keras model (for its input shape and parameter counts).
        flow_run_id: The Prefect flow run, when there is one.
    """
    from model_lib.models import network_parameter_count

    config, dataset, prepared, trained, metrics = run.config, run.dataset, run.prepared, run.trained, run.metrics
    return {
        "architecture": config["architecture"],
        "parameter_count": network_parameter_count(model),
        "serving_parameter_count": int(model.count_params()),
        "input": {"shape": list(model.input_shape[1:]), "pixels": "RGB 0-255, float32 or uint8"},
        "config": config,
        "metrics": {
            key: metrics[key] for key in ("test_accuracy", "test_loss", "majority_rate", "promotion_floor", "per_class")
        }
        | {"train_seconds": trained.train_seconds, "epochs_run": trained.epochs_run},
        "training": {
            "precision": trained.precision,
            "device": trained.device,
            "backend": trained.backend,
            "device_count": trained.device_count,
        },
        "calibration": run.calibration,
        "dataset": {
            "source": dataset.source,
            "fingerprint": dataset.fingerprint,
            "test_fingerprint": prepared.test_fingerprint,
            "train_count": prepared.train_count,
            "validation_count": prepared.validation_count,
            "test_count": prepared.test_count,
            "class_names": dataset.class_names,
            "image_size": {"side": config["image_size"], "chosen": dataset.size_reason},
            "skipped_files": dataset.skipped_files,
            "gates": run.gates,
        },
        "run_key": TrainConfig(**config).run_key(dataset.fingerprint),
        "code": code_revision(),
        "libraries": library_versions(),
        "flow_run_id": flow_run_id,
    }


def report_markdown(
    name: str, version: int, champion: bool, reason: str, manifest: dict, folder: Path, embed: bool = False
) -> str:
    """The version's report: verdict and gate, headline metrics, per-class table, data summary, plots.

    Args:
        folder: The folder holding the plots.
        embed: Put the plots in as data URIs (for a Prefect artifact, which has no folder beside it)
            instead of relative links (for `report.md` in the version folder).
    """
    metrics, data, training = manifest["metrics"], manifest["dataset"], manifest["training"]
    backend = f"Keras on {training.get('backend', 'tensorflow')}"  # versions before the field: TensorFlow
    calibration = manifest.get("calibration") or {}
    calibrated = (
        f"temperature {calibration['temperature']:.3f}; test ECE {calibration['test_ece_before']:.4f} -> "
        f"{calibration['test_ece_after']:.4f}"
        if calibration
        else "not calibrated"
    )
    counts = f"{data['train_count']} train, {data['validation_count']} validation, {data['test_count']} test"
    verdict = "became champion" if champion else "stays a challenger"
    gates = data.get("gates") or {"passed": True, "warnings": []}
    data_verdict = "; ".join(["passed" if gates["passed"] else "failed", *gates["warnings"]])
    rows = "\n".join(
        f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        for c in metrics["per_class"]
    )
    plots = "\n\n".join(
        f"![{caption}]({_image_uri(folder / file) if embed else file})"
        for file, caption in PLOTS.items()
        if (folder / file).is_file()
    )
    return f"""# {name} v{version}: {verdict}

**Gate:** {reason}

**Data gates:** {data_verdict} (full report: `data_report.md`)

| metric | value |
|---|---|
| test accuracy | {metrics["test_accuracy"]:.4f} |
| test loss | {metrics["test_loss"]:.4f} |
| calibration | {calibrated} |
| unsure flags | {_flag_rules(calibration)} |
| epochs | {metrics["epochs_run"]} |
| training time | {metrics["train_seconds"]:.0f} s ({training["precision"]}, {training["device"]}, {backend}) |
| architecture | {manifest["architecture"]} ({manifest["parameter_count"]:,} parameters) |
| data | {data["source"]} ({counts}) |
| image size | {_image_size(manifest)} |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

{plots}
"""


def _flag_rules(calibration: dict) -> str:
    """What decides the prediction CSV's flag column, and on how many images (docs/prediction.md)."""
    if calibration.get("unsure_threshold") is None:
        return f"none: the flag column stays empty ({calibration.get('fitted_on') or 'not calibrated'})"
    low, high = calibration["texture_range"]
    features = calibration.get("feature_rule")
    distance = f"; or features far from every class ({features['fitted_on']})" if features else ""
    return (
        f"low_confidence below {calibration['unsure_threshold']:.3f} ({calibration['fitted_on']}); "
        f"out_of_distribution: texture outside {low:.2f}-{high:.2f}{distance}"
    )


def _image_size(manifest: dict) -> str:
    """The model's side and how it was chosen, in the report's words (versions before the record: the side)."""
    chosen = manifest["dataset"].get("image_size", {}).get("chosen")
    side = manifest["input"]["shape"][0]
    return f"{side} px ({chosen})" if chosen else f"{side} px"


def _image_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
