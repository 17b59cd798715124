"""Ctrl-C and SIGTERM stop a command within seconds, and nothing it started outlives it but the local Prefect
server other commands share.

What the command process does:
- Its Prefect server is the local one commands share (flows/local_server.py), in a session of its
  own: neither the terminal's Ctrl-C nor a forced exit reaches it, so it stays up while the flow run
  is marked Crashed and Prefect sends its last events, and for the next command.
- The first SIGINT or SIGTERM asks every long loop to stop (`model_lib.progress.request_stop`).
  That covers decoding, classifying and training steps, in any thread. A signal-wakeup pipe does
  it even while Prefect's own SIGTERM handler owns the signal during a flow run. The main thread
  then unwinds: the flow run is marked Crashed, pools shut down, one line is printed and the exit
  code is 128 + the signal (130 or 143).
- A second Ctrl-C, or a stop that takes longer than `STOP_GRACE_SECONDS` (a step stuck in C++),
  kills the children and exits at once.
- Python runs a signal handler wherever the main thread is, a garbage-collector callback (JAX
  registers one) or a `__del__` included; there an exception cannot propagate, so Python prints
  "Exception ignored ... Traceback" and carries on. The stop's exception is then raised again at the
  next safe point, and nothing is printed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

from model_lib.progress import Stopped, request_stop, stop_requested

STOP_GRACE_SECONDS = 8.0  # first signal -> forced exit if the orderly stop has not finished by then
REDELIVER_SECONDS = 0.05  # a stop swallowed where Python cannot raise -> sent again (a GC pass takes ms)
SIGNALS = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_received: list[int] = []  # the first stop signal's number, whoever handled it
_handled: list[int] = []  # the signals `_on_signal` handled (a second Ctrl-C exits at once)


def exit_code() -> int:
    """128 + the first stop signal, as a shell reports a process a signal ended."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def install() -> None:
    """Handle SIGINT and SIGTERM as the module docstring says (call once, from the main thread)."""
    if _received or signal.getsignal(signal.SIGINT) is _on_signal:
        return
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    sys.unraisablehook = _redeliver_stop(sys.unraisablehook)
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


def _redeliver_stop(hook: Any) -> Any:
    def unraisable(info: Any) -> None:
        if not (isinstance(info.exc_value, Stopped) and _handled):
            hook(info)
            return
        # Raise it again in the main thread: the handler runs afresh for the same signal. Sent a moment
        # later from another thread: sent now, it would be handled here, where it cannot raise either.
        signum = _handled.pop()
        again = threading.Timer(REDELIVER_SECONDS, signal.pthread_kill, args=(threading.main_thread().ident, signum))
        again.daemon = True
        again.start()

    return unraisable


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
    for child in multiprocessing.active_children():
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
