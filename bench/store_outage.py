"""Seconds until a command gives up on an object store that stops answering, side by side in one run: `models list`
(the CLI, as a user runs it) and a registration (the registry's write path, in this process), each against a
frozen server (SIGSTOP: connections accepted, never answered) and a refused one (the port closed).

    python bench/store_outage.py
    CIFAR_PIPELINE_STORE_SECONDS=10 python bench/store_outage.py

The store is a real S3-compatible server process (moto) on 127.0.0.1, as in the tests. The budget is
`CIFAR_PIPELINE_STORE_SECONDS` (default 30 s); each request also gives up on its own after
`stores.STORE_CONNECT_SECONDS` to connect and `STORE_READ_SECONDS` to answer. A case passes when it ends
within the budget plus one read timeout plus 5 s, with one `error:` line (the CLI) or one `StoreError` (the
registry), and the registry is unchanged afterwards.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CLI = [sys.executable, "-c", "from flows.cli import main; main()"]  # the console script, in this interpreter
MARGIN_SECONDS = 5.0  # on top of the budget and one read timeout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    from bench.registry_store import cpu_model, manifest, version_files
    from model_lib.registry import Registry
    from model_lib.stores import STORE_READ_SECONDS, StoreError, store_retry_seconds
    from tests.s3server import S3Server, environment

    budget = store_retry_seconds()
    limit = budget + STORE_READ_SECONDS + MARGIN_SECONDS
    scratch = Path(tempfile.mkdtemp(prefix="store-outage-"))
    server = S3Server(scratch)
    url = f"s3://{server.new_bucket()}/team"
    for name, value in {**server.env, "CIFAR_PIPELINE_CACHE": str(scratch / "cache")}.items():
        os.environ[name] = value
    (scratch / "files").mkdir()
    files = version_files(scratch / "files", extra_files=0)
    Registry(url).register(files, manifest(0.5))
    env = {**os.environ, **environment(server, url, scratch / "cli-cache")}

    def models_list() -> str:
        done = subprocess.run([*CLI, "models", "list"], env=env, capture_output=True, text=True, timeout=600)
        lines = done.stderr.strip().splitlines()
        return f"exit {done.returncode}, {len(lines)} stderr line(s): {lines[-1][:110] if lines else ''}"

    def register() -> str:
        try:
            Registry(url).register(files, manifest(0.6))
        except StoreError as error:
            return f"StoreError: {str(error)[:110]}"
        return "registered (the store answered)"

    def frozen(action: Callable[[], str]) -> str:
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            return action()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)

    def refused(action: Callable[[], str]) -> str:
        server.gate.close()
        try:
            return action()
        finally:
            server.gate.open()

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; budget {budget:.0f} s, a case passes within {limit:.0f} s")
    print(f"| case | seconds | within {limit:.0f} s | outcome |\n|---|---|---|---|")
    try:
        for outage_name, outage in (("frozen", frozen), ("refused", refused)):
            for action_name, action in (("`models list`", models_list), ("registration", register)):
                started = time.monotonic()
                outcome = outage(action)
                seconds = time.monotonic() - started
                print(f"| {action_name}, {outage_name} | {seconds:.1f} | {'yes' if seconds <= limit else 'NO'} | "
                      f"{outcome} |", flush=True)  # fmt: skip
        state = Registry(url).state()
        print(f"\nafterwards: versions {[v['version'] for v in state['versions']]}, champion "
              f"v{state['aliases']['champion']}")  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
