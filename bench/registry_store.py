"""What a registry in an object store costs against one on the local disk, side by side in one process:
register a version, resolve `champion` to a local folder (cold: a new machine's empty cache; warm:
the copy is there), and load the verified model.

    python bench/registry_store.py
    python bench/registry_store.py --rounds 5 --tensorboard-files 40

The object store is a real S3-compatible server process (moto in server mode) on 127.0.0.1, as in
the tests; on a real network each request costs its round trip on top. The version is `default`'s
airbench network at width 1 (flip TTA, random weights) with its probe, as training registers it,
plus `--tensorboard-files` small files standing in for the run's plots, metrics and TensorBoard logs.
The variants take turns in each round; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def version_files(folder: Path, extra_files: int) -> dict[str, Path]:
    """A served model with its probe, and small side files, as `register_task` hands them over."""
    from model_lib.models import build_model, with_tta

    model = with_tta(build_model("airbench", 10, seed=0))
    model.save(folder / "model.keras")
    inputs = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    np.savez(folder / "probe.npz", inputs=inputs, outputs=model.predict(inputs, verbose=0))
    files = {"model.keras": folder / "model.keras", "probe.npz": folder / "probe.npz"}
    for index in range(extra_files):
        path = folder / f"side-{index:03d}.json"
        path.write_text(json.dumps({"index": index, "values": list(range(500))}))
        files[f"tensorboard/side-{index:03d}.json"] = path
    return files


def manifest(accuracy: float) -> dict:
    return {"architecture": "airbench", "metrics": {"test_accuracy": accuracy, "promotion_floor": 0.1},
            "dataset": {"test_fingerprint": "bench", "class_names": [str(i) for i in range(10)]},
            "config": {"image_size": 32}}  # fmt: skip


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (median reported)")
    parser.add_argument("--tensorboard-files", type=int, default=20, help="small side files per version")
    args = parser.parse_args()
    if args.rounds < 1 or args.tensorboard_files < 0:
        parser.error("--rounds must be at least 1 and --tensorboard-files at least 0")

    from model_lib.registry import Registry
    from model_lib.versions import load_verified_model
    from tests.s3server import S3Server

    scratch = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    server = S3Server(scratch)
    os.environ.update(server.direct_env)
    try:
        files = version_files(scratch, args.tensorboard_files)
        size_mb = sum(path.stat().st_size for path in files.values()) / 1e6
        locations = {"local": str(scratch / "artifacts"), "s3": f"s3://{server.new_bucket()}/bench"}
        times: dict[str, dict[str, list[float]]] = {name: {} for name in locations}
        for round_index in range(args.rounds):
            for name, location in locations.items():
                cache = scratch / f"cache-{name}-{round_index}"
                os.environ["CIFAR_PIPELINE_CACHE"] = str(cache)
                registry = Registry(location)
                record = times[name]
                record.setdefault("register", []).append(
                    timed(lambda r=registry, i=round_index: r.register(files, manifest(0.5 + i / 100)))
                )
                os.environ["CIFAR_PIPELINE_CACHE"] = str(cache) + "-new-machine"
                fresh = Registry(location)
                record.setdefault("resolve (cold cache)", []).append(timed(lambda r=fresh: r.resolve("champion")))
                record.setdefault("resolve (warm cache)", []).append(timed(lambda r=fresh: r.resolve("champion")))
                folder = fresh.resolve("champion")
                record.setdefault("load verified model", []).append(timed(lambda f=folder: load_verified_model(f)))
        print(f"host: {cpu_model()}, {os.cpu_count()} cores; version {size_mb:.1f} MB "
              f"in {len(files)} files; median of {args.rounds} rounds")  # fmt: skip
        steps = list(times["local"])
        print("| step | local disk (ms) | s3 on loopback (ms) | ratio |\n|---|---|---|---|")
        for step in steps:
            local, remote = (statistics.median(times[name][step]) for name in ("local", "s3"))
            print(f"| {step} | {local * 1e3:.1f} | {remote * 1e3:.1f} | {remote / local:.1f}x |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
