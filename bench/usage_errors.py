"""How fast a mistake is answered: each bad command as a user types it, timed from start to exit.

    python bench/usage_errors.py [--runs 3]

Runs the installed `cifar-pipeline` console script (from the virtual environment beside this
checkout) in a fresh process per case, against a throw-away ARTIFACTS_DIR holding one registered
model, and prints one JSON line per case: exit code, the median seconds, the one line printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLI = str(Path(sys.executable).with_name("cifar-pipeline"))

CASES = {
    "unknown profile": ["train", "--profile", "fastest"],
    "unknown architecture": ["train", "--architecture", "resnet"],
    "epochs 0": ["train", "--epochs", "0"],
    "validation split 1": ["train", "--validation-split", "1"],
    "missing data folder": ["train", "--data", "/nonexistent/images"],
    "top-k above classes": ["predict", "{inbox}", "--top-k", "11"],
    "predict a file": ["predict", "{inbox}/photo.jpg"],
    "output over an input image": ["predict", "{inbox}", "--output", "{inbox}/photo.jpg"],
    "unknown model": ["predict", "{inbox}", "--model", "nosuch@v1"],
    "promote without a reason": ["models", "promote", "cifar10@v1", "--reason", ""],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        from PIL import Image

        from model_lib.models import build_model
        from tests.registered import register_keras_model

        artifacts, inbox = Path(scratch) / "artifacts", Path(scratch) / "inbox"
        register_keras_model(artifacts, build_model("seed_cnn", 10), Path(scratch))
        inbox.mkdir()
        Image.new("RGB", (32, 32)).save(inbox / "photo.jpg")
        env = {**os.environ, "ARTIFACTS_DIR": str(artifacts)}
        for case, arguments in CASES.items():
            command = [CLI, *(a.format(inbox=inbox) for a in arguments)]
            seconds = []
            for _ in range(args.runs):
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
                seconds.append(time.perf_counter() - started)
            lines = done.stderr.strip().splitlines()
            median = round(statistics.median(seconds), 2)
            result = {"case": case, "exit": done.returncode, "median_seconds": median, "lines": len(lines)}
            print(json.dumps({**result, "message": lines[-1] if lines else ""}), flush=True)


if __name__ == "__main__":
    main()
