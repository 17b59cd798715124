"""The app's speed next to batch prediction's, on one model and machine, in one run.

    python bench/app_speed.py --model cifar10@champion [--data ../shared/datasets/cifar10] [--images 2000]

With ARTIFACTS_DIR pointing at the registry. Starts `cifar-pipeline app --port 0` in its own process, as
a user would, and measures from this process over HTTP with keep-alive connections:
  1. latency of one 32x32 CIFAR-10 test JPEG per request, one request at a time: p50 and p99;
  2. images/s from 1, 8 and 32 concurrent clients (threads), one image per request;
  3. images/s from one client sending 64 images per request;
and, in this process on the same images and model, batch prediction's own path (a shard as the
batch-predict flow classifies it: the decoding pool, the model in batches of 256, the CSV), warm.
The clients share the two cores with the server, as they would on a laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def start_app(model: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", "from flows.cli import main; main()", "app", "--model", model, "--port", "0"]
    app = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = app.stdout.readline()
    if " at http://" not in line:
        app.kill()
        raise SystemExit(f"the app did not start: {line!r}")
    return app, line.split(" at ")[1].split("/ ")[0]


def latency(url: str, images: list[tuple[str, bytes]], requests: int) -> dict:
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(requests + 20):
            name, data = images[i % len(images)]
            started = time.perf_counter()
            answer = client.post("/api/predict", files=[("file", (name, data))])
            if i >= 20:  # after warm-up requests
                times.append(time.perf_counter() - started)
            answer.raise_for_status()
    quantiles = statistics.quantiles(times, n=100)
    return {"requests": requests, "p50_ms": round(1000 * quantiles[49], 2), "p99_ms": round(1000 * quantiles[98], 2)}


def throughput(url: str, images: list[tuple[str, bytes]], clients: int, per_request: int = 1) -> dict:
    import httpx

    requests = [images[i : i + per_request] for i in range(0, len(images), per_request)]
    shares = [requests[c::clients] for c in range(clients)]
    failures = []

    def client(share) -> None:
        with httpx.Client(base_url=url, timeout=120) as session:
            for batch in share:
                answer = session.post("/api/predict", files=[("file", item) for item in batch])
                if answer.status_code != 200:
                    failures.append(answer.status_code)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"clients": clients, "images_per_request": per_request, "images": len(images),
            "images_per_second": round(len(images) / seconds, 1), "failures": len(failures)}  # fmt: skip


def batch_prediction(paths: list[Path], model: str, runs: int = 3) -> dict:
    """Images/s of a shard as the batch-predict flow classifies it, warm (pool started, model loaded)."""
    from model_lib.images import FolderEntry
    from model_lib.predict import classify_shard, resolve_model, start_local_workers, write_shard
    from model_lib.settings import artifacts_location

    info = resolve_model(model, artifacts_location())
    start_local_workers(info)
    root = paths[0].parents[1]
    entries = [FolderEntry(path.relative_to(root).as_posix(), "image") for path in paths]
    speeds = []
    with tempfile.TemporaryDirectory() as scratch:
        shard = Path(scratch) / "shard.json"
        write_shard(entries, shard)
        for run in range(runs + 1):
            started = time.perf_counter()
            counts = classify_shard(str(root), str(shard), info, str(Path(scratch) / "part.csv"))
            if run:  # the first run warms the pool's processes and traces the model
                speeds.append(len(paths) / (time.perf_counter() - started))
    assert counts["ok"] == len(paths), counts
    return {"images_per_second": round(statistics.median(speeds), 1), "runs": [round(s, 1) for s in speeds],
            "version": info.version}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10@champion")
    parser.add_argument("--data", default=os.environ.get("CIFAR10_DIR") or str(REPO.parent / "shared/datasets/cifar10"))
    parser.add_argument("--images", type=int, default=2000, help="CIFAR-10 test JPEGs, the same number per class")
    parser.add_argument("--latency-requests", type=int, default=300)
    args = parser.parse_args()

    classes = sorted((Path(args.data) / "test").iterdir())
    paths = [p for folder in classes for p in sorted(folder.iterdir())[: args.images // len(classes)]]
    images = [(path.name, path.read_bytes()) for path in paths]
    from model_lib.precision import machine_key

    results = {"host": machine_key(), "model": args.model, "images": len(images)}
    results["batch_prediction"] = batch_prediction(paths, args.model)
    print(json.dumps(results["batch_prediction"]), flush=True)
    app, url = start_app(args.model)
    try:
        results["latency"] = latency(url, images, args.latency_requests)
        print(json.dumps(results["latency"]), flush=True)
        results["throughput"] = []
        for clients, per_request in ((1, 1), (8, 1), (32, 1), (1, 64)):
            results["throughput"].append(throughput(url, images, clients, per_request))
            print(json.dumps(results["throughput"][-1]), flush=True)
    finally:
        app.terminate()
        app.wait(timeout=30)
    batch = results["batch_prediction"]["images_per_second"]
    for row in results["throughput"]:
        row["share_of_batch_prediction"] = round(row["images_per_second"] / batch, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
