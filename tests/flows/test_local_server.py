"""The local Prefect server that commands share when PREFECT_API_URL is unset (flows/local_server.py, issue 60):
started by the first command, shared by commands at once and after, replaced when it stops answering, stopped
when idle or asked. Real `cifar-pipeline predict` processes on a real server, as on a laptop."""

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from bench.stop_time import CLI
from flows import local_server
from model_lib.fileio import read_json
from model_lib.serving import serving_export
from tests.conftest import local_servers
from tests.flows.test_readme import readme_command

pytestmark = pytest.mark.slow  # real commands, and the servers they start
STARTED = "Started a local Prefect server at "


@pytest.fixture
def images(trained_and_exported, laptop_env, tmp_path) -> Path:
    """The session's exported version (an export serves: no TensorFlow in the commands) and its test
    images; the commands' cache is this test's."""
    source, _ = trained_and_exported
    laptop_env |= {"ARTIFACTS_DIR": str(source), "CIFAR_PIPELINE_CACHE": str(tmp_path / "cache")}
    return source.parent / "colours" / "test"


def predict(images: Path, output: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "predict", str(images), "--model", "colours", "--output", str(output)], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def finished(process: subprocess.Popen) -> str:
    """The stderr of a command that succeeded."""
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return err


def server_state(env: dict[str, str]) -> tuple[dict | None, Path]:
    (folder,) = (Path(env["PREFECT_HOME"]) / local_server.FOLDER).iterdir()
    return local_server.read_state(folder), folder


def test_commands_at_once_and_after_share_one_server_and_one_that_hangs_is_replaced(images, tmp_path, laptop_env):
    together = [predict(images, tmp_path / f"{name}.csv", laptop_env) for name in ("a", "b")]
    said = [finished(process) for process in together]
    assert sum(err.count(STARTED) for err in said) == 1, said  # one started it, the other waited and used it
    state, folder = server_state(laptop_env)
    assert [server.pid for server in local_servers(tmp_path)] == [state["pid"]]

    later = finished(predict(images, tmp_path / "c.csv", laptop_env))
    assert STARTED not in later and server_state(laptop_env)[0] == state  # reused, not started again
    rows = {name: (tmp_path / f"{name}.csv").read_text() for name in "abc"}
    assert rows["a"] == rows["b"] == rows["c"] and len(rows["a"].splitlines()) > 1
    version = Path(laptop_env["ARTIFACTS_DIR"]) / "models" / "colours" / "v1"
    served = serving_export(read_json(version / "manifest.json"))  # auto: the fastest export on this host
    assert served and served in rows["a"]  # an export, served without TensorFlow: a command is seconds

    # A server that stops answering (stopped, as by a debugger or a swapped-out machine) is replaced; once it
    # runs again it sees that its state is no longer its own and exits, having no users left.
    hung = psutil.Process(state["pid"])
    hung.send_signal(signal.SIGSTOP)
    try:
        replaced = finished(predict(images, tmp_path / "d.csv", laptop_env))
    finally:
        hung.send_signal(signal.SIGCONT)
    new_state = server_state(laptop_env)[0]
    assert STARTED in replaced and new_state["pid"] != state["pid"]
    assert hung.wait(timeout=30) is not None or not hung.is_running()

    status_line, stop_line = (readme_command(f"cifar-pipeline server {v}", exact=True) for v in ("status", "stop"))
    status = subprocess.run([*CLI, *status_line], env=laptop_env, capture_output=True, text=True, timeout=60)
    assert status.stdout.startswith(f"{new_state['url']} (pid {new_state['pid']}; {folder}; stops after 600 s")
    stop = subprocess.run([*CLI, *stop_line], env=laptop_env, capture_output=True, text=True, timeout=60)
    assert stop.stdout.strip() == f"stopped {new_state['url']} (pid {new_state['pid']})", stop.stderr
    psutil.wait_procs(local_servers(tmp_path), timeout=15)
    assert local_servers(tmp_path) == [] and local_server.read_state(folder) is None


def test_an_unused_server_stops_after_its_idle_seconds(images, tmp_path, laptop_env):
    refused = subprocess.run([*CLI, "predict", str(images), "--model", "colours"],
                             env={**laptop_env, local_server.IDLE_ENV: "soon"},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: {local_server.IDLE_ENV}='soon': a number of seconds from 0 to 604800"
    ), refused.stderr[-3000:]
    assert not (Path(laptop_env["PREFECT_HOME"]) / local_server.FOLDER).exists()  # refused before any start

    finished(predict(images, tmp_path / "a.csv", {**laptop_env, local_server.IDLE_ENV: "1"}))
    ended = time.monotonic()
    servers = local_servers(tmp_path)
    _, alive = psutil.wait_procs(servers, timeout=20)
    assert len(servers) <= 1 and alive == []
    assert time.monotonic() - ended < 15
    assert server_state(laptop_env)[0] is None
