"""Training speed and accuracy of the profiles, side by side in one run, on the same cached data.

    python bench/train_speed.py [--profiles seed,fast,default] [--data ../shared/datasets/cifar10]

Each profile runs the real `train-cifar` flow (ingest served from the cache, which the first step
fills), timed from the flow's start to its registration: the wall time a user of
`cifar-pipeline train` waits with the data already cached and a Prefect server running (the
temporary one this process starts before the first profile, so that it does not count against
it). Prints a JSON summary per profile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="seed,fast,default")
    parser.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(REPO.parent / "shared/datasets/cifar10")))
    parser.add_argument("--artifacts", default=None, help="ARTIFACTS_DIR to use (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["ARTIFACTS_DIR"] = args.artifacts or scratch
        from prefect import flow

        from flows.train_cifar import train_cifar
        from model_lib.config import resolve_config
        from model_lib.data import ingest
        from model_lib.fileio import read_json
        from model_lib.settings import artifacts_dir

        started = time.perf_counter()
        ingest(args.data, artifacts_dir(), log=lambda m: None)  # fill the cache once, untimed below
        print(json.dumps({"ingest_seconds": round(time.perf_counter() - started, 1)}), flush=True)
        flow(name="bench-warm-up")(lambda: None)()  # start Prefect's temporary server (15-20 s), untimed below
        results = {}
        for profile in args.profiles.split(","):
            started = time.perf_counter()
            registration = train_cifar(profile=profile, data=args.data, model_name=f"bench-{profile}")
            wall = time.perf_counter() - started
            manifest = read_json(Path(registration["path"]) / "manifest.json")
            results[profile] = {
                "wall_seconds": round(wall, 1),
                "train_seconds": manifest["metrics"]["train_seconds"],
                "epochs_run": manifest["metrics"]["epochs_run"],
                "test_accuracy": manifest["metrics"]["test_accuracy"],
                "precision": manifest["training"]["precision"],
                "architecture": manifest["architecture"],
                "config": resolve_config(profile).to_dict(),
            }
            print(json.dumps({profile: results[profile]}), flush=True)
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
