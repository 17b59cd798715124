"""Ctrl-C and SIGTERM sent to a real `cifar-pipeline` process stop it within seconds, with one line, the
signal's exit code, no process left behind and nothing half-written (issue 44; flows/stopping.py).

The commands run as on a laptop: no PREFECT_API_URL, so each starts the local Prefect server that later
commands share (flows/local_server.py). A stop must leave it answering: the temporary server it replaced
was the process that used to die first and keep the command retrying for minutes.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.stop_time import CLI, living_command, stop_during
from flows import local_server
from model_lib.models import build_model
from model_lib.registry import Registry
from tests.conftest import REPO
from tests.flows.test_edges import colour_training
from tests.registered import register_keras_model

STOP_LIMIT_SECONDS = 10.0  # issue 44: the process group is gone within 10 s (the aim is under 5)


def assert_stopped_cleanly(result, signum: int, env: dict[str, str]) -> None:
    said = result.console[-3000:]
    assert result.code == 128 + signum, said
    assert result.seconds < STOP_LIMIT_SECONDS, said
    assert result.leftovers == [], said
    assert len(result.servers) == 1, said  # the local server the command started, for the next one
    (folder,) = (Path(env["PREFECT_HOME"]) / local_server.FOLDER).iterdir()
    state = local_server.read_state(folder)
    assert state is not None and local_server.healthy(state["url"]), said
    stop_lines = [line for line in result.console.splitlines() if line.startswith("stopped by ")]
    assert len(stop_lines) == 1, said
    assert signal.Signals(signum).name in stop_lines[0]
    for noise in ("Traceback", "Unable to connect", "Aborted!", "KeyboardInterrupt", "ConnectError"):
        assert noise not in result.console, noise


def test_an_exited_child_nobody_reaped_is_no_leftover_but_a_running_one_is():
    # In CI the container's PID 1 reaps no orphans: a child that exited stays a zombie, runs nothing.
    exited = subprocess.Popen(["true"])
    running = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(exited.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert living_command(psutil.Process(exited.pid)) is None
        assert living_command(psutil.Process(running.pid)) is not None  # its command line may still be empty
    finally:
        running.kill()
        running.wait()
        exited.wait()


# A signal whose handler ran inside a garbage-collector callback (JAX registers one): Python cannot raise
# there, so it printed "Exception ignored ... Traceback" in CI and the stop rested on the loops' checks.
GC_CALLBACK_STOP = """
import gc, signal, time
from flows import stopping
from model_lib.progress import Stopped


def signal_once(phase, info):
    gc.callbacks.clear()
    signal.raise_signal(signal.SIGINT)  # its handler runs before this returns, inside the callback


stopping.install()
gc.callbacks.append(signal_once)
try:
    gc.collect()
    time.sleep(5)
    print("not stopped")
except Stopped as stop:
    print(f"raised: {stop}")
"""


def test_a_stop_signal_handled_inside_a_gc_callback_is_raised_again_in_the_main_thread():
    done = subprocess.run(
        [sys.executable, "-c", GC_CALLBACK_STOP], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.stdout.strip() == "raised: stopped by SIGINT (Ctrl-C)", done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.real_data
@pytest.mark.parametrize("signum, group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
@pytest.mark.slow
def test_a_prediction_stops_within_seconds_and_leaves_no_csv_and_no_process(
    cifar_dir, artifacts, tmp_path, laptop_env, signum, group
):
    register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)
    output = tmp_path / "out" / "predictions.csv"
    output.parent.mkdir()
    command = [*CLI, "predict", str(cifar_dir / "test"), "--output", str(output)]
    marker = f"into {output}"  # the flow's line: the run is under way
    result = stop_during(command, laptop_env, marker, signum, group=group)
    assert_stopped_cleanly(result, signum, laptop_env)
    assert "no CSV was written" in result.console
    assert list(output.parent.iterdir()) == []  # neither the CSV nor its shards' parts folder


@pytest.mark.real_data
@pytest.mark.slow
def test_a_second_run_writing_the_same_output_is_refused_while_the_first_runs(
    cifar_dir, artifacts, tmp_path, laptop_env, prefect_api_env
):
    register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)
    output = tmp_path / "predictions.csv"
    env = {**laptop_env, **prefect_api_env}  # the claim is what is checked, not the server
    command = [*CLI, "predict", str(cifar_dir / "test"), "--output", str(output)]
    second: list[subprocess.CompletedProcess] = []

    def run_second(first: subprocess.Popen) -> None:
        first.send_signal(signal.SIGSTOP)  # alive and holding its claim, however slowly this machine runs the second
        try:
            second.append(subprocess.run(command, env=env, capture_output=True, text=True, timeout=300))
        finally:
            first.send_signal(signal.SIGCONT)

    first = stop_during(command, env, f"into {output}", signal.SIGINT, group=True, after=0, meanwhile=run_second)
    assert first.code == 130 and "Classifying" in first.console  # it was working until stopped
    assert second[0].returncode == 1, second[0].stderr[-2000:]
    errors = [line for line in second[0].stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {output}: another prediction run is writing this file now; wait for it to finish "
                      "or choose another --output"], second[0].stderr[-2000:]  # fmt: skip


@pytest.mark.slow
def test_training_stopped_by_sigterm_registers_nothing_and_leaves_no_process(colour_dataset, artifacts, laptop_env):
    command = colour_training(colour_dataset, "stopped", epochs=400)
    result = stop_during(command, laptop_env, "epoch 2/400:", signal.SIGTERM, group=False)
    assert_stopped_cleanly(result, signal.SIGTERM, laptop_env)
    assert Registry(artifacts, "stopped").state()["versions"] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "code", "name"), [(signal.SIGINT, 130, "SIGINT (Ctrl-C)"), (signal.SIGTERM, 143, "SIGTERM")]
)
def test_a_busy_app_stops_within_seconds_and_answers_its_request_503(stop, code, name, artifacts, tmp_path):
    """60 images of 25 MP in one request: their decoding, in a worker thread no cancellation reaches, once held
    Ctrl-C for 38-120 s and ended in a CancelledError traceback; it now stops at the next image."""
    import io
    import threading

    import httpx
    import numpy as np
    from PIL import Image

    register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)
    ramp = np.linspace(0, 255, 5000, dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(np.stack([np.tile(ramp, (5000, 1))] * 3, -1)).save(png, "PNG")  # 25 MP, 0.1 MB
    files = [("file", (f"{i}.png", png.getvalue())) for i in range(60)]
    app = subprocess.Popen([*CLI, "app", "--port", "0", "--max-upload-mb", "1000"], env=os.environ.copy(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = app.stdout.readline().split(" at ")[1].split()[0]
    answer = {}
    request = threading.Thread(
        target=lambda: answer.update(r=httpx.post(f"{url}api/predict", files=files, timeout=300))
    )
    request.start()
    time.sleep(4)  # decoding (about 0.3 s an image)
    sent = time.monotonic()
    app.send_signal(stop)
    assert app.wait(timeout=60) == code
    took = time.monotonic() - sent
    request.join(timeout=30)
    stderr = app.stderr.read()
    assert took < 5, took
    assert answer["r"].status_code == 503 and "the app is stopping" in answer["r"].json()["detail"]
    assert (
        stderr.strip().splitlines()[-1]
        == f"stopped by {name}: requests in flight were answered 503 (the app is stopping)"
    )
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr[-3000:]
