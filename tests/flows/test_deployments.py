"""End to end: a real Prefect server and process worker run both deployments from prefect.yaml."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import psutil
import pytest

from model_lib.fileio import read_json
from model_lib.registry import verify_version
from tests.conftest import REPO

pytestmark = [pytest.mark.real_data, pytest.mark.slow]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "cifar-process-pool"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def background(command: list[str], env: dict, log: Path):
    """Start a process in its own session; on exit stop it and every descendant, and check none is left."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        yield process
    finally:
        tree = [process.pid] + [child.pid for child in _children(process.pid)]
        for pid in tree:
            _signal(pid, signal.SIGTERM)
        _, alive = psutil.wait_procs([p for p in map(_process, tree) if p], timeout=20)
        for leftover in alive:
            leftover.kill()
        psutil.wait_procs(alive, timeout=10)
        assert not [p for p in map(_process, tree) if p and p.is_running() and p.status() != "zombie"]


def _children(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def read_deployment(api: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def prefect(*args: str, env: dict, timeout: float = 120) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_deployments_run_on_a_real_server_and_worker(cifar_slice, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "CIFAR10_DIR": str(cifar_slice),
        "PWD": str(REPO),
        "COLUMNS": "200",
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(command, server_env, server_log) as server:
        wait_healthy(api, server, server_log)
        prefect("work-pool", "create", POOL, "--type", "process", env=env)
        with background([PREFECT, "worker", "start", "--pool", POOL], env, worker_log):
            prefect("--no-prompt", "deploy", "--all", env=env, timeout=300)
            training = read_deployment(api, "train-cifar/weekly-retrain")
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in training.schedules] == [
                ("0 3 * * 0", "UTC", True)
            ]
            assert training.global_concurrency_limit.limit == 1 and training.work_pool_name == POOL
            assert training.parameters == {"profile": "default"}
            assert read_deployment(api, "batch-predict/on-demand").schedules == []

            try:
                prefect("deployment", "run", "train-cifar/weekly-retrain", "--param", "profile=smoke",
                        "--param", "max_train_images=400", "--param", "max_test_images=200",
                        "--param", "learned_margin=-1",  # 4 steps on 160 images: this checks deployment, not learning
                        "--watch", "--watch-timeout", "900", env=env, timeout=960)  # fmt: skip
                version_dir = tmp_path / "artifacts" / "models" / "cifar10" / "v1"
                assert verify_version(version_dir) == []
                manifest = read_json(version_dir / "manifest.json")
                assert manifest["config"]["profile"] == "smoke" and manifest["dataset"]["train_count"] == 160

                output = tmp_path / "predictions.csv"
                prefect("deployment", "run", "batch-predict/on-demand",
                        "--param", f"input_dir={cifar_slice / 'test' / 'cat'}", "--param", f"output_csv={output}",
                        "--watch", "--watch-timeout", "600", env=env, timeout=660)  # fmt: skip
                table = pd.read_csv(output)
                assert len(table) == 10 and set(table["status"]) == {"ok"}
            finally:
                print(worker_log.read_text()[-6000:])
