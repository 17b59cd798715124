"""End to end: a real Prefect server and process worker run both deployments from prefect.yaml, and
`cifar-pipeline watch` turns new files into events that the deployments' triggers act on."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pandas as pd
import psutil
import pytest

from bench.stop_time import living_command
from flows.alerts import BLOCK_ENV, FAILED, OVERDUE, WEBHOOK_ENV
from model_lib.config import CHOICES, PROFILES
from model_lib.fileio import read_json
from model_lib.versions import verify_version
from tests.conftest import REPO, TF_STARTUP_NOTES

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
def background(command: list[str], env: dict, log: Path, cwd: Path = REPO):
    """Start a process in its own session; on exit stop it and every descendant, and check none is left."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
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
        assert not [line for p in map(_process, tree) if p and (line := living_command(p)) is not None]


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


def flow_runs(api: str, deployment: str) -> list:
    """Every flow run of a deployment, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment_id = read_deployment(api, deployment).id
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        )


def automation(api: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        (found,) = client.read_automations_by_name(name)
        return found


def triggered(api: str, deployment: str) -> list:
    """The deployment's flow runs that an automation (a deployment trigger) created."""
    return [run for run in flow_runs(api, deployment) if run.created_by and run.created_by.type == "AUTOMATION"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(2)
    raise TimeoutError(f"no {what} after {timeout}s")


@contextmanager
def webhook_receiver():
    """A webhook on 127.0.0.1 that keeps the JSON bodies POSTed to it: where the alerts go."""
    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the handler's name is http.server's)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()


def prefect(*args: str, env: dict, timeout: float = 120) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


SERVICE_GUIDE = REPO / "docs" / "service.md"


def guide_steps() -> dict:
    """docs/service.md's numbered commands, as written: `{0: the line every terminal starts with (the
    first of its shell blocks), N: step N}`, each without its comment, and whether it runs in its own
    terminal."""
    steps: dict = {}
    fence = None
    for line in SERVICE_GUIDE.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence else line.removeprefix("```")
            continue
        command, _, comment = line.partition("   # ")
        if fence == "bash" and command.strip():
            number = re.match(r"\s*(\d+)\.", comment)
            steps.setdefault(int(number.group(1)) if number else 0, (command.strip(), "own terminal" in comment))
    assert list(steps) == list(range(len(steps))), steps  # one preamble, then the steps in order
    return steps


def guide_step(number: int, *extra: str, env: dict, log: Path | None = None, timeout: float = 300):
    """Run step `number` of docs/service.md as written (plus `extra` arguments) from the checkout, in a
    shell that began with the guide's first line; a step marked `own terminal` starts in the background."""
    steps = guide_steps()
    command, own_terminal = steps[number]
    script = f"{steps[0][0]} && {'exec ' if own_terminal else ''}{command} {shlex.join(extra)}"
    if own_terminal:
        return background(["bash", "-c", script], env, log)
    done = subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"step {number} ({command}) failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def guide_env(tmp_path: Path, port: int) -> dict:
    """The environment of a terminal that follows docs/service.md: this session's settings less the ones the
    guide's service.env sets, a port of its own, and this test's HOME and storage."""
    own = ("PREFECT_", "TF_CPP_MIN_LOG_LEVEL")  # the guide's service.env sets these, not the test session
    return {**{k: v for k, v in os.environ.items() if not k.startswith(own)},
            "HOME": str(tmp_path),  # the guide's ~/photos
            "PREFECT_HOME": str(tmp_path / "prefect_home"),
            "PREFECT_SERVER_API_PORT": str(port),  # what `export PREFECT_SERVER_API_PORT=...` would do
            "ARTIFACTS_DIR": str(tmp_path / "artifacts"), "COLUMNS": "200"}  # fmt: skip


# What a server's scheduler logs when it cannot schedule (SQLAlchemy 2.1 under Prefect 3.9: "Can't evaluate
# bulk DML statement" every minute, and no run ever scheduled).
SCHEDULER_ERROR = re.compile(r"Traceback|sqlalchemy\.exc|Unexpected error in: .*Scheduler")


def refuse_unsendable_alerts(env: dict) -> None:
    """An alert that could never be sent stops step 4 in one line, before anything is deployed."""
    steps = guide_steps()
    without = {k: v for k, v in env.items() if k not in (WEBHOOK_ENV, BLOCK_ENV)}  # each checked on its own
    for name, value in ((WEBHOOK_ENV, "http://[::1"), (BLOCK_ENV, "nonexistent/thing")):
        refused = subprocess.run(["bash", "-c", f"{steps[0][0]} && {steps[4][0]}"], env={**without, name: value},
                                 cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip().splitlines()[-1]], refused.stderr
        assert refused.stderr.strip().startswith(f"error: {name} {value!r}: "), refused.stderr


def check_the_weekly_schedule(api: str, server_log: Path) -> None:
    """The server's scheduler put the weekly retrain's next runs on the calendar (Prefect's recent-deployments loop
    does within seconds of step 4) and logged no error. Under SQLAlchemy 2.1 the deployment looked right too: only
    the scheduler failed, and no run was ever scheduled."""
    scheduled = wait_for(
        lambda: [run for run in flow_runs(api, "train-cifar/weekly-retrain") if run.state.is_scheduled()],
        150, "scheduled run of train-cifar/weekly-retrain")  # fmt: skip
    starts = [run.expected_start_time for run in scheduled]
    assert all(start.weekday() == 6 and (start.hour, start.minute) == (3, 0) for start in starts), starts
    assert not SCHEDULER_ERROR.search(server_log.read_text()), server_log.read_text()[-4000:]


def test_the_service_guide_runs_as_written_and_new_files_trigger_runs(cifar_slice, cifar_dir, tmp_path):
    with webhook_receiver() as (webhook, alerts):
        run_the_service_guide(cifar_slice, cifar_dir, tmp_path, webhook, alerts)


def run_the_service_guide(cifar_slice: Path, cifar_dir: Path, tmp_path: Path, webhook: str, alerts: list) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    artifacts = tmp_path / "artifacts"
    env = {**guide_env(tmp_path, port), "PREFECT_WORKER_QUERY_SECONDS": "2", "CIFAR10_DIR": str(cifar_slice),
           WEBHOOK_ENV: webhook}  # fmt: skip  # read by `prefect deploy`: the alerts go there
    client_env = {**env, "PREFECT_API_URL": api}  # for this test's own `prefect` and `cifar-pipeline` calls
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((cifar_slice / "test" / "ship").iterdir())[:6]:
        shutil.copyfile(path, photos / path.name)
    server_log, worker_log, watch_log = tmp_path / "server.log", tmp_path / "worker.log", tmp_path / "watch.log"
    with guide_step(1, env=env, log=server_log) as server:
        wait_healthy(api, server, server_log)
        guide_step(2, env=env)
        with guide_step(3, env=env, log=worker_log):
            refuse_unsendable_alerts(env)
            guide_step(4, env=env)
            training = read_deployment(api, "train-cifar/weekly-retrain")
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in training.schedules] == [
                ("0 3 * * 0", "UTC", True)
            ]
            assert training.global_concurrency_limit.limit == 1 and training.work_pool_name == POOL
            assert training.parameters == {"profile": "default"}
            predicting = read_deployment(api, "batch-predict/on-demand")
            assert predicting.schedules == [] and predicting.global_concurrency_limit.limit == 1
            failed_alert, overdue_alert = automation(api, FAILED), automation(api, OVERDUE)
            assert overdue_alert.trigger.within == timedelta(days=8)  # the weekly schedule, plus a day's grace
            assert failed_alert.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
            # The UI's parameter forms: every parameter described, choices as enums from their one declaration.
            for name in ("train-cifar/weekly-retrain", "batch-predict/on-demand"):
                schema = read_deployment(api, name).parameter_openapi_schema["properties"]
                assert [p for p, spec in schema.items() if not spec.get("description")] == [], name
            schema = training.parameter_openapi_schema["properties"]
            assert schema["profile"]["enum"] == list(PROFILES)
            assert schema["precision"]["anyOf"][0]["enum"] == list(CHOICES["precision"])
            serve = subprocess.run([str(Path(sys.executable).parent / "cifar-pipeline"), "serve"], env=client_env,
                                   capture_output=True, text=True, timeout=120)  # fmt: skip
            assert serve.returncode == 2 and "belongs to work pool cifar-process-pool" in serve.stderr, serve.stderr

            try:
                # tiny on 160 images: this checks the deployment, not learning.
                trained_now = guide_step(5, "--param", "profile=tiny", "--param", "learned_margin=-1",
                                         "--watch-timeout", "900", env=env, timeout=960)  # fmt: skip
                (trained,) = [run for run in flow_runs(api, "train-cifar/weekly-retrain") if run.state.is_final()]
                assert trained.state.message == "registered cifar10 v1, champion"
                assert "registered cifar10 v1, champion" in trained_now.stdout  # --watch shows the outcome
                kept = trained.state.result()  # Prefect kept the return value, under ARTIFACTS_DIR
                assert (kept["name"], kept["version"], kept["champion"]) == ("cifar10", 1, True)
                version_dir = artifacts / "models" / "cifar10" / "v1"
                assert verify_version(version_dir) == []
                manifest = read_json(version_dir / "manifest.json")
                assert manifest["config"]["profile"] == "tiny" and manifest["dataset"]["train_count"] == 160

                # No parameters and no inbox yet: the run fails in one line naming its parameter, and the
                # shipped automation sends one alert naming the deployment and the error.
                unset = subprocess.run([PREFECT, "deployment", "run", "batch-predict/on-demand", "--watch",
                                        "--watch-timeout", "300"], env=client_env, cwd=REPO, capture_output=True,
                                       text=True, timeout=360)  # fmt: skip
                assert unset.returncode != 0, unset.stdout
                (failed,) = [run for run in flow_runs(api, "batch-predict/on-demand") if run.state.is_failed()]
                assert "input_dir: not given, and the default inbox" in failed.state.message, failed.state.message
                wait_for(lambda: alerts, 120, "alert")
                time.sleep(5)  # a second alert for the same run would have come by now
                assert len(alerts) == 1, alerts
                assert "batch-predict/on-demand Failed" in alerts[0]["subject"], alerts
                assert failed.name in alerts[0]["body"] and "input_dir: not given" in alerts[0]["body"], alerts

                guide_step(6, env=env)  # the inbox, with ~/photos in it
                predicted = guide_step(7, "--watch-timeout", "600", env=env, timeout=660)
                (written,) = (artifacts / "predictions").glob("inbox-*.csv")  # a new CSV under ARTIFACTS_DIR
                table = pd.read_csv(written)
                assert sorted(table["path"]) == sorted(p.name for p in photos.iterdir())
                assert set(table["status"]) == {"ok"}
                (done,) = [run for run in flow_runs(api, "batch-predict/on-demand") if run.state.is_completed()]
                assert done.state.message.startswith("6 ok (") and done.state.message.endswith(f"-> {written}")
                assert done.state.message.split(" -> ")[0] in predicted.stdout  # the CSV's path may wrap there

                inbox = artifacts / "inbox"
                with guide_step(8, "--quiet-seconds", "2", "--param", "max_train_images=400", env=env, log=watch_log):
                    wait_for(lambda: "Watching" in watch_log.read_text(), 60, "watcher start")
                    new_images = sorted((cifar_slice / "test" / "dog").iterdir())[:3]
                    for path in new_images:  # a burst: one event, one run for exactly these files
                        shutil.copyfile(path, inbox / path.name)
                    run = wait_for(lambda: triggered(api, "batch-predict/on-demand"), 120, "triggered batch-predict")
                    assert len(run) == 1 and sorted(run[0].parameters["files"]) == [p.name for p in new_images]
                    wait_for(lambda: triggered(api, "batch-predict/on-demand")[0].state.is_final(), 300, "finished run")
                    assert triggered(api, "batch-predict/on-demand")[0].state.is_completed()
                    (burst,) = set((artifacts / "predictions").glob("inbox-*.csv")) - {written}
                    table = pd.read_csv(burst)
                    assert sorted(table["path"]) == [p.name for p in new_images] and set(table["status"]) == {"ok"}

                    for path in sorted((cifar_dir / "train" / "cat").iterdir())[100:120]:
                        shutil.copyfile(path, cifar_slice / "train" / "cat" / path.name)
                    wait_for(lambda: triggered(api, "train-cifar/weekly-retrain"), 120, "retrain")
                    time.sleep(15)  # the rest of the burst, had it sent more events, would have started more runs
                    retrains = triggered(api, "train-cifar/weekly-retrain")
                    assert len(retrains) == 1, [r.name for r in retrains]
                    assert retrains[0].parameters["data"] == str(cifar_slice.resolve())
                    assert retrains[0].parameters["skip_unchanged"] is True
                    # the guide's `--param profile=fast` and this test's own: the event's parameters
                    assert (retrains[0].parameters["profile"], retrains[0].parameters["max_train_images"]) == (
                        "fast", 400)  # fmt: skip
                    # Training it: not here (step 5 did). On 200 images it may already have ended.
                    cancel = subprocess.run([PREFECT, "flow-run", "cancel", str(retrains[0].id)], env=client_env,
                                            capture_output=True, text=True, timeout=120)  # fmt: skip
                    assert cancel.returncode == 0 or "already in terminal state" in cancel.stdout, cancel.stdout
                    assert (
                        "1 file change(s)" not in watch_log.read_text() and "20 file change(s)" in watch_log.read_text()
                    )
                assert not TF_STARTUP_NOTES.search(worker_log.read_text())
                # Checked last, minutes after step 4: a scheduler that fails on a later pass has logged it by now.
                check_the_weekly_schedule(api, server_log)
            finally:
                print(worker_log.read_text()[-6000:])
                print(watch_log.read_text()[-3000:] if watch_log.exists() else "")
        assert "Failed to send telemetry" not in server_log.read_text()  # service.env turned it off


def test_two_workers_in_empty_folders_share_one_registry_in_an_object_store(cifar_slice, tmp_path, s3_server):
    """No checkout, no disk in common: each worker starts in an empty folder with an empty cache of its own;
    the registry and the CSV live in a bucket of a real S3-compatible server."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    bucket = f"s3://{s3_server.new_bucket()}/team"
    base = {**os.environ, **s3_server.env, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
            "COLUMNS": "200"}  # fmt: skip
    base.pop("ARTIFACTS_DIR", None)
    server_env = {k: v for k, v in base.items() if k != "PREFECT_API_URL"}
    machines = {name: tmp_path / name for name in ("worker-a", "worker-b")}
    for folder in machines.values():
        folder.mkdir()

    def worker_env(name: str) -> dict:
        return {**base, "ARTIFACTS_DIR": bucket, "CIFAR10_DIR": str(cifar_slice),
                "CIFAR_PIPELINE_CACHE": str(machines[name] / "cache")}  # fmt: skip

    def worker(name: str):
        return background([PREFECT, "worker", "start", "--pool", POOL, "--name", name], worker_env(name),
                          tmp_path / f"{name}.log", cwd=machines[name])  # fmt: skip

    with background([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env,
                    tmp_path / "server.log") as server:  # fmt: skip
        wait_healthy(api, server, tmp_path / "server.log")
        prefect("work-pool", "create", POOL, "--type", "process", env=base)
        prefect("--no-prompt", "deploy", "--all", env=base, timeout=300)
        assert read_deployment(api, "train-cifar/weekly-retrain").pull_steps == []  # nothing ties it to this checkout
        try:
            with worker("worker-a"):
                prefect("deployment", "run", "train-cifar/weekly-retrain", "--param", "profile=tiny",
                        "--param", "learned_margin=-1", "--watch", "--watch-timeout", "900", env=base,
                        timeout=960)  # fmt: skip
            with worker("worker-b"):
                output = f"{bucket}/reports/cats.csv"
                prefect("deployment", "run", "batch-predict/on-demand",
                        "--param", f"input_dir={cifar_slice / 'test' / 'cat'}", "--param", f"output_csv={output}",
                        "--watch", "--watch-timeout", "600", env=base, timeout=660)  # fmt: skip
        finally:
            for name in machines:
                print(name, (tmp_path / f"{name}.log").read_text()[-4000:])
        (training,) = [run for run in flow_runs(api, "train-cifar/weekly-retrain") if not run.state.is_scheduled()]
        (predicting,) = flow_runs(api, "batch-predict/on-demand")
        assert training.state.is_completed() and predicting.state.is_completed()
        client = s3_server.client()
        name, _, prefix = bucket.removeprefix("s3://").partition("/")
        keys = {item["Key"] for item in client.list_objects_v2(Bucket=name, Prefix=prefix)["Contents"]}
        assert {f"{prefix}/models/cifar10/registry.json", f"{prefix}/models/cifar10/v1/report.md"} <= keys
        table = pd.read_csv(client.get_object(Bucket=name, Key=f"{prefix}/reports/cats.csv")["Body"])
        assert len(table) == 10 and set(table["status"]) == {"ok"} and table["model"].str.contains("cifar10 v1").all()
        for folder in machines.values():  # each worker kept only caches; nothing shared landed on its disk
            assert not (folder / "artifacts").exists()
        assert (machines["worker-b"] / "cache" / "registries").is_dir()  # worker B read v1 from the bucket
