"""Pruning side by side: one registered airbench version pruned at several kept shares by each criterion, each
fine-tuned, gated, registered and exported by the prune-version flow; then, in the same process, every version's
test accuracy, FLOPs, parameters, int8 file size and model-only speed (Keras and int8 TFLite on the version's own
pre-decoded test images, batches of 256, best of two rounds that alternate between versions), the parent's too.

    ARTIFACTS_DIR=/work/bench_fast/art python bench/prune_speed.py --model cifar10@v1 --keep 0.25,0.5,0.75

The parent needs its TFLite exports (`cifar-pipeline export`) and its cached dataset. The pruned versions are
registered beside it with a promotion margin of 1, so the champion does not move while the bench runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def images_per_second(classifier, pixels: np.ndarray, batch: int = 256) -> float:
    classifier.predict_on_batch(pixels[:batch])
    started = time.perf_counter()
    for start in range(0, len(pixels), batch):
        classifier.predict_on_batch(pixels[start : start + batch])
    return len(pixels) / (time.perf_counter() - started)


def main() -> None:
    from model_lib.config import PRUNE_CRITERIA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the registered version to prune, e.g. cifar10@v1")
    parser.add_argument("--keep", default="0.25,0.5,0.75", help="comma-separated shares of channels kept")
    parser.add_argument("--criteria", default=",".join(PRUNE_CRITERIA), help="comma-separated criteria")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the version's own)")
    args = parser.parse_args()
    keeps = [float(keep) for keep in args.keep.split(",")]
    criteria = args.criteria.split(",")
    if unknown := [c for c in criteria if c not in PRUNE_CRITERIA]:
        parser.error(f"--criteria: unknown {', '.join(unknown)}; choose from {', '.join(PRUNE_CRITERIA)}")

    from flows.prune_version import prune_version
    from model_lib.data import cached_dataset, load_arrays
    from model_lib.fileio import read_json
    from model_lib.inference import KerasClassifier, TFLiteClassifier
    from model_lib.models import unwrap_tta
    from model_lib.prune import flops
    from model_lib.registry import parse_reference
    from model_lib.settings import artifacts_location, work_dir
    from model_lib.versions import load_verified_model

    parent_dir = parse_reference(args.model, artifacts_location())
    versions = {"parent": parent_dir}
    for criterion in criteria:
        for keep in keeps:
            started = time.perf_counter()
            result = prune_version(model=str(parent_dir), keep=keep, criterion=criterion, epochs=args.epochs,
                                   export=True, promotion_margin=1.0)  # fmt: skip
            versions[f"{criterion} {keep:g}"] = Path(result["path"])
            print(json.dumps({"pruned": f"{criterion} {keep:g}", "version": result["version"],
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)  # fmt: skip

    manifest = read_json(parent_dir / "manifest.json")
    dataset = cached_dataset(work_dir(), manifest["dataset"]["fingerprint"], "its test images can be classified")
    pixels = np.asarray(load_arrays(dataset.cache_dir).x_test)
    rows = {}
    for name, version_dir in versions.items():
        record = read_json(version_dir / "manifest.json")
        int8 = next(entry for entry in record["exports"] if entry["format"] == "int8")
        model = load_verified_model(version_dir)
        rows[name] = {
            "version": record["version"],
            "test_accuracy": record["metrics"]["test_accuracy"],
            "int8_test_accuracy": int8["test_accuracy"],
            "mflops_per_view": round(flops(unwrap_tta(model)[0]) / 1e6, 1),
            "parameters": record["parameter_count"],
            "int8_bytes": int8["size_bytes"],
            "classifiers": (KerasClassifier(model), TFLiteClassifier(version_dir / int8["file"])),
            "keras": 0.0,
            "int8": 0.0,
        }
    for _ in range(2):  # alternating rounds: a slow moment of the machine is shared out
        for row in rows.values():
            for engine, classifier in zip(("keras", "int8"), row["classifiers"], strict=True):
                row[engine] = max(row[engine], images_per_second(classifier, pixels))
    parent = rows["parent"]
    print(json.dumps({"host": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "images": len(pixels)}))  # fmt: skip
    for name, row in rows.items():
        row.pop("classifiers")
        row |= {"keras": round(row["keras"]), "int8": round(row["int8"]),
                "keras_speedup": round(row["keras"] / parent["keras"], 2),
                "int8_speedup": round(row["int8"] / parent["int8"], 2),
                "accuracy_change": round(row["test_accuracy"] - parent["test_accuracy"], 4)}  # fmt: skip
        print(json.dumps({"variant": name, **row}), flush=True)


if __name__ == "__main__":
    main()
