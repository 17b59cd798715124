"""Training speed and accuracy of the profiles, side by side in one run, on the same cached data.

    python bench/train_speed.py [--profiles seed,fast,default] [--data ../shared/datasets/cifar10]
    python bench/train_speed.py --profiles smoke,default --data digits --set epochs=3 --set batch_size=128
    python bench/train_speed.py --profiles default --data scattered-digits --image-sizes 32,64,128 \
        --set epochs=8 --set batch_size=64

Each profile runs the real `train-cifar` flow (ingest served from the cache, which the first step
fills), timed from the flow's start to its registration: the wall time a user of
`cifar-pipeline train` waits with the data already cached and a Prefect server running (the
temporary one this process starts before the first profile, so that it does not count against
it). Prints a JSON summary per profile, with the seconds of each of the flow's tasks as Prefect
recorded them (where the time outside training goes). `--data digits` trains on scikit-learn's
digits as 8x8 greyscale PNGs, the tests' small folder; `--data scattered-digits`, the same digits at
16 px on 128-px canvases of noise (tests/synthetic.py), a folder whose accuracy depends on the image size.
`--set` passes a flow parameter to every profile (`--set epochs=3`); `--image-sizes` runs each profile at
each of these sizes (`auto` or pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from train_jax import parse_override  # noqa: E402  (a neighbour in bench/, the script's folder)

from model_lib.config import parse_image_size  # noqa: E402

GENERATED = {"digits": "write_digits_dataset", "scattered-digits": "write_scattered_digits_dataset"}  # tests/synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="seed,fast,default")
    parser.add_argument("--data", default=os.environ.get("CIFAR10_DIR", str(REPO.parent / "shared/datasets/cifar10")))
    parser.add_argument("--artifacts", default=None, help="ARTIFACTS_DIR to use (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], type=parse_override, help="PARAMETER=VALUE for every run")
    parser.add_argument("--image-sizes", default="auto", help="each profile runs at each: auto,32,...")
    args = parser.parse_args()
    _check(parser, args)

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["ARTIFACTS_DIR"] = args.artifacts or scratch
        from prefect import flow

        from flows.train_cifar import train_cifar
        from model_lib.data import ingest
        from model_lib.fileio import read_json
        from model_lib.settings import work_dir

        if args.data in GENERATED:
            from tests import synthetic

            args.data = str(getattr(synthetic, GENERATED[args.data])(Path(scratch) / args.data))
        sizes = [parse_image_size(size) for size in args.image_sizes.split(",")]
        for size in sizes:
            started = time.perf_counter()
            ingest(args.data, work_dir(), size, log=lambda m: None)  # fill the cache once, untimed below
            print(
                json.dumps({"image_size": size, "ingest_seconds": round(time.perf_counter() - started, 1)}), flush=True
            )
        flow(name="bench-warm-up")(lambda: None)()  # start Prefect's temporary server (15-20 s), untimed below
        results = {}
        for profile, size in ((profile, size) for profile in args.profiles.split(",") for size in sizes):
            key = profile if len(sizes) == 1 else f"{profile}@{size}"
            started = time.perf_counter()
            state = train_cifar(
                profile=profile, data=args.data, model_name=f"bench-{profile}", image_size=size, **dict(args.set),
                return_state=True,
            )  # fmt: skip
            wall = time.perf_counter() - started
            registration = state.result()
            manifest = read_json(Path(registration["path"]) / "manifest.json")
            results[key] = {
                "host": platform.processor() or platform.machine(),
                "wall_seconds": round(wall, 1),
                "train_seconds": manifest["metrics"]["train_seconds"],
                "image_size": manifest["config"]["image_size"],
                "train_images_per_second": round(
                    manifest["dataset"]["train_count"]
                    * manifest["metrics"]["epochs_run"]
                    / manifest["metrics"]["train_seconds"]
                ),
                "epochs_run": manifest["metrics"]["epochs_run"],
                "test_accuracy": manifest["metrics"]["test_accuracy"],
                "precision": manifest["training"]["precision"],
                "architecture": manifest["architecture"],
                "config": manifest["config"],
                "task_seconds": task_seconds(state.state_details.flow_run_id),
            }
            print(json.dumps({key: results[key]}), flush=True)
        print(json.dumps(results, indent=2))


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One argparse line (exit 2) for an unknown profile or flow parameter or a missing data folder,
    before the ingest and the Prefect server start."""
    import inspect

    from flows.train_cifar import train_cifar
    from model_lib.config import PROFILES
    from model_lib.sources import DatasetError, resolve_source

    if unknown := [profile for profile in args.profiles.split(",") if profile not in PROFILES]:
        parser.error(f"--profiles: unknown {', '.join(unknown)}; choose from {', '.join(PROFILES)}")
    parameters = set(inspect.signature(train_cifar.fn).parameters) - {"profile", "data", "model_name"}
    if unknown := [name for name, _ in args.set if name not in parameters]:
        choices = ", ".join(sorted(parameters))
        parser.error(f"--set: {', '.join(unknown)} is not a train-cifar parameter; choose from {choices}")
    try:
        [parse_image_size(size) for size in args.image_sizes.split(",")]
    except ValueError as error:
        parser.error(f"--image-sizes: {str(error).removeprefix('--image-size is ')}")
    if args.data not in GENERATED:
        try:
            resolve_source(args.data)
        except DatasetError as error:
            parser.error(f"--data: {error}")


def task_seconds(flow_run_id) -> dict[str, float]:
    """Each task of a flow run and its seconds from start to end, as the Prefect API recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(30):  # task states reach the API as events, shortly after the flow returns
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if runs and all(run.start_time and run.end_time for run in runs):
                break
            time.sleep(1)
    finished = sorted((run for run in runs if run.start_time and run.end_time), key=lambda run: run.start_time)
    return {run.name.rsplit("-", 1)[0]: round((run.end_time - run.start_time).total_seconds(), 1) for run in finished}


if __name__ == "__main__":
    main()
