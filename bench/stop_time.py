"""Seconds from Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM to the exit of a
`cifar-pipeline` command, during prediction and during training, side by side in one run.

    python bench/stop_time.py --data ../shared/datasets/cifar10
    python bench/stop_time.py --data ../shared/datasets/cifar10 --rounds 3 --signal SIGTERM

Each round trains nothing new: a `smoke` model is trained once into a temporary ARTIFACTS_DIR, then
every variant runs its command (on the local Prefect server, as on a laptop), waits until the work is
under way, sends the signal and times the exit. A variant also reports the exit code and whether any
process the command started was still alive 10 s after the signal (the shared local server is meant to
be; it is stopped at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from flows import local_server

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from flows.cli import main; main()"]  # the console script, in this interpreter
LEFTOVER_SECONDS = 10.0  # a child still alive this long after the signal counts as left behind
SHARED_SERVER = local_server.__name__  # in its command line: the server other commands share, meant to stay


@dataclass(frozen=True)
class StopResult:
    code: int  # the command's exit status
    seconds: float  # from the signal to the command's exit
    leftovers: list[str]  # command lines of started processes alive LEFTOVER_SECONDS after the signal
    servers: list[str]  # the local Prefect servers among them, which other commands share: left running
    console: str  # stdout and stderr, interleaved


def stop_during(
    command: list[str],
    env: dict[str, str],
    marker: str,
    signum: int,
    group: bool,
    after: float = 1.0,
    meanwhile: Callable[[subprocess.Popen], None] | None = None,
) -> StopResult:
    """Run `command`, send `signum` `after` seconds past the first output line containing `marker`, time the exit.

    Args:
        group: Signal the whole process group (a terminal's Ctrl-C) rather than the command's process only.
        meanwhile: Called with the process once the marker appeared, before the signal (to run another
            command meanwhile).
    """
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not seen.wait(600):
        process.kill()
        raise RuntimeError(f"{marker!r} never appeared:\n{''.join(lines)[-3000:]}")
    if meanwhile is not None:
        meanwhile(process)
    time.sleep(after)
    children = psutil.Process(process.pid).children(recursive=True)
    sent = time.perf_counter()
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    code = process.wait(60)
    seconds = time.perf_counter() - sent
    reader.join(5)
    _, alive = psutil.wait_procs(children, timeout=max(0.0, LEFTOVER_SECONDS - (time.perf_counter() - sent)))
    running = [(child, line) for child in alive if (line := living_command(child)) is not None]
    servers = [line for _, line in running if SHARED_SERVER in line]
    for child, line in running:
        if SHARED_SERVER not in line:
            with contextlib.suppress(psutil.Error):
                child.kill()
    return StopResult(code, seconds, [line for _, line in running if SHARED_SERVER not in line], servers,
                      "".join(lines))  # fmt: skip


def living_command(process: psutil.Process) -> str | None:
    """The command line of a process still running, or None once it exited.

    An orphan that exited stays a zombie where the container's PID 1 reaps no one (as in CI): it runs
    nothing, so it is no leftover.
    """
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return " ".join(process.cmdline())[:120]
    except psutil.NoSuchProcess:  # ZombieProcess included
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the CIFAR-10 image folder (train/ and test/)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (median reported)")
    parser.add_argument("--signal", choices=["SIGINT", "SIGTERM"], default="SIGINT", help="sent to the group")
    args = parser.parse_args()
    if args.rounds < 1 or not (args.data / "train").is_dir():
        parser.error("--rounds must be at least 1, and --data must hold a train/ folder")
    signum = signal.Signals[args.signal]
    artifacts = Path(tempfile.mkdtemp(prefix="stop-time-"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the local server, as on a laptop
    env.update(ARTIFACTS_DIR=str(artifacts), CIFAR10_DIR=str(args.data), PREFECT_HOME=str(artifacts / "prefect"))
    subprocess.run([*CLI, "train", "--profile", "smoke"], env=env, check=True, capture_output=True)
    variants = {
        "predict (50,000 JPEGs)": (
            [*CLI, "predict", str(args.data / "train"), "--output", str(artifacts / "stopped.csv")],
            f"into {artifacts / 'stopped.csv'}",  # the flow's line: the run is under way
        ),
        "train (smoke, 60 epochs)": ([*CLI, "train", "--profile", "smoke", "--epochs", "60"], "epoch 2/60:"),
    }
    # A stopped training run resumes when run again with the same config: a seed per round starts it afresh.
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, (command, marker) in variants.items():
            command = [*command, "--seed", str(round_index + 1)] if command[3] == "train" else command
            result = stop_during(command, env, marker, signum, group=True)
            times[name].append(result.seconds)
            print(f"round {round_index + 1} {name}: exit {result.code} after {result.seconds:.2f} s, "
                  f"left behind: {result.leftovers or 'nothing'}", flush=True)  # fmt: skip
    subprocess.run([*CLI, "server", "stop"], env=env, check=True, capture_output=True)
    print(f"\n{args.signal} to the process group, median of {args.rounds} (host: {os.cpu_count()} cores)")
    for name, seconds in times.items():
        print(f"  {name:<26} {statistics.median(seconds):6.2f} s  (max {max(seconds):.2f})")


if __name__ == "__main__":
    main()
