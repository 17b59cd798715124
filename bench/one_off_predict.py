"""Wall time of one-off `cifar-pipeline predict` calls (10 images, a registered int8 export): a Prefect server
per command against the local server that commands share (issue 60), side by side in one run.

    python bench/one_off_predict.py --data ../shared/datasets/cifar10
    python bench/one_off_predict.py --data ../shared/datasets/cifar10 --cli .venv-serve/bin/cifar-pipeline

It trains `tiny` with its TFLite exports once into a temporary ARTIFACTS_DIR and copies 10 test images
(untimed), then times each variant's calls in turn, each variant under a PREFECT_HOME of its own:
- a server per command: CIFAR_PIPELINE_SERVER_IDLE_SECONDS=0, so every call starts a server that stops
  when the call ends, as Prefect's temporary server did (less the 1 s its stop took);
- the shared local server (the default): the first call starts it, the later ones find it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows import local_server

CLI = [sys.executable, "-c", "from flows.cli import main; main()"]  # the console script, in this interpreter
IMAGES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the CIFAR-10 image folder (train/ and test/)")
    parser.add_argument("--calls", type=int, default=4, help="predict calls per variant")
    parser.add_argument("--cli", default=None, help="the predict command's program (default: this interpreter's)")
    args = parser.parse_args()
    if args.calls < 2 or not (args.data / "test").is_dir():
        parser.error("--calls must be at least 2, and --data must hold a test/ folder")
    cli = shlex.split(args.cli) if args.cli else CLI
    work = Path(tempfile.mkdtemp(prefix="one-off-"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # as on a laptop
    env |= {"ARTIFACTS_DIR": str(work / "artifacts"), "CIFAR10_DIR": str(args.data)}
    subprocess.run([*CLI, "train", "--profile", "tiny", "--export"], env={**env, "PREFECT_HOME": str(work / "t")},
                   check=True, capture_output=True)  # fmt: skip
    int8 = work / "artifacts" / "models" / "cifar10" / "v1" / "model_int8.tflite"  # as `auto` serves `fast`'s
    images = work / "images"
    images.mkdir()
    for path in sorted((args.data / "test").rglob("*.jpg"))[:IMAGES]:
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    variants = {"a server per command": {local_server.IDLE_ENV: "0"}, "shared local server": {}}
    seconds: dict[str, list[float]] = {}
    command = [*cli, "predict", str(images), "--model", str(int8), "--output", str(work / "p.csv"), "--overwrite"]
    for name, extra in variants.items():
        home = {**env, **extra, "PREFECT_HOME": str(work / name.replace(" ", "-"))}
        seconds[name] = []
        for call in range(args.calls):
            started = time.perf_counter()
            done = subprocess.run(command, env=home, capture_output=True, text=True)
            seconds[name].append(time.perf_counter() - started)
            if done.returncode != 0 or "model_int8.tflite" not in done.stdout + done.stderr:
                sys.exit(f"{name}, call {call + 1} failed or did not serve the int8 export:\n{done.stderr[-2000:]}")
            print(f"{name}, call {call + 1}: {seconds[name][-1]:.2f} s", flush=True)
        subprocess.run([*cli, "server", "stop"], env=home, check=True, capture_output=True)
    print(f"\n{IMAGES} images, int8 export ({os.cpu_count()} cores): first call, then the median of the others")
    for name, times in seconds.items():
        print(f"  {name:<22} {times[0]:6.2f} s, then {statistics.median(times[1:]):.2f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
