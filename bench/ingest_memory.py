"""Peak memory and speed of ingest plus one training epoch as a dataset grows, and training speed by image size.

    python bench/ingest_memory.py [--counts 10000,50000,100000] [--side 128] [--speed-sides 32,64,128]

Writes a folder of synthetic JPEGs once (`--side` px, 10 classes: a colour gradient per class under noise,
enough to be a dataset, not a benchmark of accuracy), then for each count runs, in a fresh process each so
that each peak is its own: a cold ingest of that many training images (class-balanced cap, 1,000 test
images) at `--side` px, and one epoch of `fast`'s recipe (airbench at half width, batch 256) from the cache,
the way `train` does it but without Prefect. Each run reports its peak resident memory (the kernel's
high-water mark, VmHWM) after ingest and after the epoch, and its training images per second. Then, on the
smallest count, one epoch at each of `--speed-sides`. Prints one JSON line per run and records the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10
TEST_IMAGES = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10000,50000,100000", help="training images per run")
    parser.add_argument("--side", type=int, default=128, help="pixels per side of the files and the runs")
    parser.add_argument("--speed-sides", default="32,64,128", help="image sizes of the speed runs")
    parser.add_argument("--work", default=None, help="folder for the images and caches (default: a temporary one)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child run: JSON of its arguments
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))), flush=True)
        return
    counts = [int(count) for count in args.counts.split(",")]
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        data = Path(scratch) / "images"
        started = time.perf_counter()
        write_images(data, max(counts), args.side)
        written = round(time.perf_counter() - started)
        print(
            json.dumps(
                {"host": host(), "cores": os.cpu_count(), "files": max(counts) + TEST_IMAGES, "seconds": written}
            )
        )
        runs = [dict(count=count, side=args.side) for count in counts]
        runs += [dict(count=min(counts), side=int(side)) for side in args.speed_sides.split(",")]
        for number, run in enumerate(runs):
            child = {**run, "data": str(data), "artifacts": str(Path(scratch) / f"artifacts-{number}")}
            done = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(child)], capture_output=True, text=True, check=False
            )
            if done.returncode:
                sys.exit(f"run {run} failed:\n{done.stderr[-3000:]}")
            print(done.stdout.strip().splitlines()[-1], flush=True)


def host() -> str:
    """The CPU's model name and whether it has AMX, from /proc/cpuinfo (platform.processor() says x86_64)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return f"{name or platform.machine()}{', AMX' if ' amx_tile' in text else ''}"


def write_images(root: Path, train: int, side: int) -> None:
    """`train` training and `TEST_IMAGES` test JPEGs, spread over `CLASSES` classes, written by every core."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(root / "train", i, train, side) for i in range(CLASSES)]
    jobs += [(root / "test", i, TEST_IMAGES, side) for i in range(CLASSES)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_class, *zip(*jobs, strict=True)))


def _write_class(split: Path, label: int, total: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    folder = split / f"class{label}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    base = np.array([label * 25, 255 - label * 25, (label * 70) % 256], np.float32)
    for i in range(total // CLASSES):
        pixels = base * ramp[:, None, None] + rng.normal(0, 40, (side, side, 3)).astype(np.float32)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=85)


def peak_mib() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_one(count: int, side: int, data: str, artifacts: str) -> dict:
    """Ingest `count` training images at `side` px, then train one epoch of `fast`; the peaks after each."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.path.insert(0, str(REPO))
    from model_lib.config import resolve_config
    from model_lib.data import ingest
    from model_lib.preprocess import prepare_split
    from model_lib.runs import read_history
    from model_lib.train import train

    config = resolve_config("fast", data=data, image_size=side, epochs=1, max_train_images=count,
                            max_test_images=TEST_IMAGES, learned_margin=-1.0)  # fmt: skip
    started = time.perf_counter()
    dataset = ingest(data, Path(artifacts), side, count, TEST_IMAGES, log=lambda message: None)
    ingest_seconds, ingest_peak = time.perf_counter() - started, peak_mib()
    run_dir = Path(artifacts) / "run"
    run_dir.mkdir(parents=True)
    prepared = prepare_split(dataset.cache_dir, dataset.class_names, config, run_dir)
    result = train(config.at_size(side), dataset, Path(prepared.split_path), run_dir, log=lambda message: None)
    history = read_history(Path(result.history_path))
    return {
        "train_images": dataset.train_count, "side": side, "ingest_seconds": round(ingest_seconds, 1),
        "peak_mib_after_ingest": ingest_peak, "peak_mib_after_epoch": peak_mib(),
        "cache_mib": round(sum(f.stat().st_size for f in Path(dataset.cache_dir).iterdir()) / 2**20),
        "epoch_seconds": round(float(history["epoch_seconds"].iloc[0]), 1),
        "train_images_per_second": round(prepared.train_count / float(history["epoch_seconds"].iloc[0])),
        "precision": result.precision,
    }  # fmt: skip


if __name__ == "__main__":
    main()
