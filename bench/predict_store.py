"""Batch prediction on a folder in an object store against the same folder on the local disk, side by
side in one process: images/s of the batch-predict flow (thread-pool runner, each run cold: its
decoding pool and model started afresh) on the CIFAR-10 test JPEGs.

    python bench/predict_store.py --data ../shared/datasets/cifar10
    python bench/predict_store.py --data ../shared/datasets/cifar10 --images 2000 --rounds 3

Variants, taking turns in each round: the local folder; `s3://` with an empty cache (a new machine:
the local copy is fetched in the run); `s3://` again (the copy is there: the run lists the bucket and
fetches nothing). The store is moto in server mode on 127.0.0.1 (a separate process, as in the
tests). The model is `default`'s network with flip TTA and random weights: the figures are speed only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the CIFAR-10 image folder (its test/ is used)")
    parser.add_argument("--images", type=int, default=10_000, help="test images used (class-ordered prefix)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant (median reported)")
    args = parser.parse_args()
    if args.rounds < 1 or args.images < 1 or not (args.data / "test").is_dir():
        parser.error("--rounds and --images must be at least 1, and --data must hold a test/ folder")

    import boto3

    from bench.registry_store import cpu_model, manifest, version_files
    from flows.batch_predict import batch_predict
    from model_lib.predict import reset_workers
    from model_lib.registry import Registry
    from tests.s3server import S3Server

    scratch = Path(tempfile.mkdtemp(prefix="predict-store-"))
    server = S3Server(scratch)
    os.environ.update(server.direct_env)
    try:
        folder = scratch / "test"
        paths = sorted(p for p in (args.data / "test").rglob("*") if p.is_file())[: args.images]
        for path in paths:
            target = folder / path.relative_to(args.data / "test")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
        bucket = server.new_bucket()
        client = boto3.client("s3", endpoint_url=server.direct_env["AWS_ENDPOINT_URL"])
        with ThreadPoolExecutor(4) as pool:  # moto serves one request at a time
            list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"test/{p.relative_to(folder).as_posix()}",
                                                      Body=p.read_bytes()), sorted(folder.rglob("*.jpg"))))  # fmt: skip
        os.environ["ARTIFACTS_DIR"] = str(scratch / "artifacts")
        (scratch / "run").mkdir()
        model_dir = Path(Registry(scratch / "artifacts").register(version_files(scratch / "run", 0),
                                                                  manifest(0.5)).path)  # fmt: skip
        variants = {"local disk": str(folder), "s3, empty cache": f"s3://{bucket}/test", "s3, copy there": None}
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            for name, source in variants.items():
                if name == "s3, empty cache":
                    os.environ["CIFAR_PIPELINE_CACHE"] = str(scratch / f"cache-{round_index}")
                source = source or f"s3://{bucket}/test"
                reset_workers()
                summary = batch_predict(source, output_csv=str(scratch / f"{round_index}.csv"), model=str(model_dir),
                                        overwrite=True)  # fmt: skip
                assert summary["ok"] == len(paths), summary
                rates[name].append(summary["images_per_second"])
        print(f"host: {cpu_model()}, {os.cpu_count()} cores; {len(paths)} test JPEGs; median of {args.rounds} rounds")
        local = statistics.median(rates["local disk"])
        print("| source | images/s | of local |\n|---|---|---|")
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"| {name} | {rate:.0f} | {rate / local:.0%} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
