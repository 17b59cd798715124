"""Ctrl-C and SIGTERM stop a command within seconds, and nothing it started outlives it.

What the command process does:
- It starts Prefect's temporary server itself, in a process group of its own. The terminal's Ctrl-C
  goes to the foreground group only, so the server stays up while the flow run is marked Crashed
  and Prefect sends its last events. The server dies with this process even on SIGKILL
  (`PR_SET_PDEATHSIG` on Linux), and it is stopped last.
- The first SIGINT or SIGTERM asks every long loop to stop (`model_lib.progress.request_stop`).
  That covers decoding, classifying and training steps, in any thread. A signal-wakeup pipe does
  it even while Prefect's own SIGTERM handler owns the signal during a flow run. The main thread
  then unwinds: the flow run is marked Crashed, pools shut down, one line is printed and the exit
  code is 128 + the signal (130 or 143).
- A second Ctrl-C, or a stop that takes longer than `STOP_GRACE_SECONDS` (a step stuck in C++),
  kills the children and exits at once.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from model_lib.progress import Stopped, request_stop, stop_requested

STARTUP_FAILED_EXIT_CODE = 3  # uvicorn's exit when its port is in use, or its app failed to start
PORT_TAKEN = "address already in use"  # uvicorn's line for the first
TEMPORARY_SERVER_START_SECONDS = 90  # at least, unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set
STOP_GRACE_SECONDS = 8.0  # first signal -> forced exit if the orderly stop has not finished by then
SIGNALS = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_received: list[int] = []  # the first stop signal's number, whoever handled it
_handled: list[int] = []  # the signals `_on_signal` handled (a second Ctrl-C exits at once)
_server = None  # the temporary Prefect server this process started, if any


def exit_code() -> int:
    """128 + the first stop signal, as a shell reports a process a signal ended."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def install() -> None:
    """Handle SIGINT and SIGTERM as the module docstring says (call once, from the main thread)."""
    if _received or signal.getsignal(signal.SIGINT) is _on_signal:
        return
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(read_end,), name="stop-on-signal", daemon=True).start()


def _on_signal(signum: int, frame: Any) -> None:
    _first_signal(signum)
    _handled.append(signum)
    if len(_handled) == 1:
        raise Stopped(f"stopped by {SIGNALS[signum]}")
    if signum == signal.SIGINT:
        exit_now("second Ctrl-C")
    # A repeated SIGTERM (Prefect re-sends one after handling its own) changes nothing: the stop is under way.


def _watch_signals(read_end: int) -> None:
    """Sees every signal with a Python handler, whoever's handler it is, as soon as it arrives."""
    while True:
        for signum in os.read(read_end, 64):
            if signum in SIGNALS:
                _first_signal(signum)


_first_lock = threading.Lock()


def _first_signal(signum: int) -> None:
    with _first_lock:
        if _received:
            return
        _received.append(signum)
    request_stop(SIGNALS[signum])
    timer = threading.Timer(STOP_GRACE_SECONDS, exit_now, args=(f"still stopping after {STOP_GRACE_SECONDS:.0f} s",))
    timer.daemon = True
    timer.start()


def exit_now(why: str) -> None:
    """Kill every child process and leave without cleanup: the last resort of a stop."""
    sys.stderr.write(f"stopped: {why}; ending child processes and exiting now\n")
    sys.stderr.flush()
    children = multiprocessing.active_children()
    if _server is not None and _server.server_process is not None:
        children.append(_server.server_process)
    for child in children:
        try:
            child.kill()
        except (OSError, ValueError):
            pass  # already gone
    os._exit(exit_code())


def interrupted_line() -> str:
    """The one line a stopped command prints."""
    return f"stopped by {stop_requested() or SIGNALS[signal.SIGINT]}"


def stop_children() -> None:
    """The orderly end of a stop: decoding pools first (cancelling queued work), other children after."""
    if "model_lib.predict" in sys.modules:
        sys.modules["model_lib.predict"].reset_workers()
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=2)


def start_temporary_server() -> None:
    """Start Prefect's temporary API server owned by this process (see the module docstring).

    Prefect's clients find it as the process's one temporary server and use it instead of starting
    their own. Its `atexit` stop, registered now, runs after Prefect's later exit hooks have sent
    their events.
    """
    global _server
    import types

    import httpx
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_HOME
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT

    class OwnedServer(prefect_server.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect's method with two more Popen arguments: its module sees a `subprocess` whose
            # Popen adds them, for this call only; nothing else in the process is touched.
            def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
                process = subprocess.Popen(
                    *args, **kwargs, process_group=0, preexec_fn=_die_with_parent, stderr=subprocess.PIPE
                )
                startup.watch(process.stderr)
                return process

            shim = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})
            prefect_server.subprocess = shim
            try:
                return super()._run_uvicorn_command()
            finally:
                prefect_server.subprocess = subprocess

        def start(self, timeout: float | None = None) -> None:
            """Prefect's start, but over when the server exits, timed by the clock, and never reading the server's
            stderr (the pump does): Prefect's read it to its end when the server was slow, and a server still
            starting never ends it, so the command hung for good; and it waited out its whole allowance for a
            server that had already exited."""
            if self.running:
                return
            self.port = self.port or self.find_available_port()
            self.running = True
            self.server_process = self._run_uvicorn_command()
            atexit.register(self.stop)
            deadline = time.monotonic() + (timeout or STARTUP_TIMEOUT.value())
            with httpx.Client() as client:
                while time.monotonic() < deadline:
                    code = self.server_process.poll()
                    if code == STARTUP_FAILED_EXIT_CODE and PORT_TAKEN in startup.drained():
                        self.port = self.find_available_port()  # taken between choosing it and binding it
                        self.server_process = self._run_uvicorn_command()
                        continue
                    if code is not None:
                        break
                    with contextlib.suppress(httpx.TransportError):
                        if client.get(f"{self.api_url}/health", timeout=5).status_code == 200:
                            return
                    time.sleep(0.1)
            self.running = False
            raise RuntimeError("Prefect's temporary server did not answer")

    startup = ServerErrors()
    _server = OwnedServer()
    # Prefect's 20 s are short for a fresh database on 2 busy cores; a value the user set is kept.
    allowance = STARTUP_TIMEOUT.value()
    if STARTUP_TIMEOUT.name not in os.environ:
        allowance = max(allowance, TEMPORARY_SERVER_START_SECONDS)
    try:
        _server.start(timeout=allowance)
    except RuntimeError:
        still_starting = _server.server_process is not None and _server.server_process.poll() is None
        _server.stop()
        if still_starting:
            raise TemporaryServerFailed(
                f"Prefect's temporary server did not answer within {allowance} s (a busy or slow machine): set "
                f"{STARTUP_TIMEOUT.name} higher, or PREFECT_API_URL to a running server"
            ) from None
        raise TemporaryServerFailed(
            f"Prefect's temporary server did not start ({startup.last_error() or 'no answer'}); its database in "
            f"{PREFECT_HOME.value()} may come from another Prefect version: set PREFECT_HOME to an empty folder, "
            "or PREFECT_API_URL to a running server"
        ) from None
    startup.forward()


class ServerErrors:
    """The temporary server's stderr: kept while it starts (a failed start becomes one line), then
    passed on to this process's stderr as before."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.forwarding = False
        self.lock = threading.Lock()
        self.pump: threading.Thread | None = None

    def watch(self, stream) -> None:
        def pump() -> None:
            for raw in stream:
                line = raw.decode(errors="replace")
                with self.lock:
                    if self.forwarding:
                        sys.stderr.write(line)
                    else:
                        self.lines.append(line)

        self.pump = threading.Thread(target=pump, name="prefect-server-stderr", daemon=True)
        self.pump.start()

    def drained(self, timeout: float = 5.0) -> str:
        """What the server wrote, once the server that exited has had its last lines read."""
        if self.pump is not None:
            self.pump.join(timeout)
        with self.lock:
            return "".join(self.lines)

    def last_error(self) -> str:
        """The last line that names an error, such as alembic's "Can't locate revision ..."."""
        errors = [line.strip() for line in self.lines if "Error" in line and line.strip()]
        return errors[-1] if errors else ""

    def forward(self) -> None:
        with self.lock:
            sys.stderr.write("".join(self.lines))
            self.forwarding = True


class TemporaryServerFailed(RuntimeError):
    """The temporary Prefect server this command starts never answered."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, however it dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
