"""The steps of prune-version around the shared training run: rank a registered version's channels and keep the best
of them; then time the fine-tuned network beside its parent and plot it with the parent's other pruned versions."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from model_lib.data import DatasetInfo, load_arrays
from model_lib.fileio import read_json, write_json
from model_lib.plots import plot_pruning
from model_lib.prune import family_points, measure_against_parent, prune_version
from model_lib.registry import Registry
from model_lib.runs import PLOT_FILES, PRUNING_FILE, TrainResult
from model_lib.settings import artifacts_location, work_dir
from model_lib.versions import MANIFEST_FILE
from tasks.common import log_info


@task(name="prune")
def prune_task(version_dir: str, keep: float | None, criterion: str, epochs: int | None,
               target_speedup: float | None = None) -> tuple[dict, DatasetInfo]:  # fmt: skip
    """The fine-tuning run's config (the version's own, with its `pruned` record) and the version's dataset."""
    return prune_version(Path(version_dir), work_dir(), keep, criterion, epochs, target_speedup, log=log_info)


@task(name="measure-pruning")
def measure_pruning_task(trained: TrainResult, dataset: DatasetInfo, config: dict, test_accuracy: float) -> dict:
    """Time the fine-tuned network beside its parent (`pruning.json`, registered with the version) and plot the
    parent with every version pruned from it, this one included (`pruning.png`, shown in report.md)."""
    pruned = config["pruned"]
    name, _, version = pruned["from"].rpartition(" v")
    registry = Registry(artifacts_location(), name)
    parent_dir = registry.version_dir(int(version))
    run_dir = Path(trained.run_dir)
    measured = measure_against_parent(parent_dir, Path(trained.model_path), load_arrays(dataset.cache_dir).x_test)
    write_json(run_dir / PRUNING_FILE, measured)
    log_info(f"Keras on {measured['images']} test images, timed beside {pruned['from']}: "
             f"{measured['images_per_second']:,.0f} images/s against {measured['parent_images_per_second']:,.0f} "
             f"({measured['speedup']:.2f}x); model.keras {measured['bytes'] / 1e6:.2f} MB against "
             f"{measured['parent_bytes'] / 1e6:.2f} MB")  # fmt: skip
    family = []
    for entry in registry.state()["versions"]:
        if entry.get("pruned_from") != pruned["from"]:
            continue
        folder = registry.version_dir(entry["version"])
        if (folder / PRUNING_FILE).is_file():  # versions pruned before the record are left out
            manifest = read_json(folder / MANIFEST_FILE)
            keep = manifest["config"]["pruned"]["keep"]
            family.append({"label": f"v{entry['version']} (keep {keep:g})", "keep": keep,
                           "accuracy": manifest["metrics"]["test_accuracy"],
                           "measured": read_json(folder / PRUNING_FILE)})  # fmt: skip
    current = f"this version (keep {pruned['keep']:g})"
    family.append({"label": current, "keep": pruned["keep"], "accuracy": test_accuracy, "measured": measured})
    points = family_points(read_json(parent_dir / MANIFEST_FILE), family)
    plot_pruning(points, current, run_dir / PLOT_FILES["pruning"])
    return measured
