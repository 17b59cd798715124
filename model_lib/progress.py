"""Progress of a long loop (training steps, decoded files, classified images) where the person is looking.

On a terminal: a rich progress bar with the count, rate and time left, drawn on stderr and gone
when the loop ends. Elsewhere (a Prefect worker, a pipe, CI): a log line at most every
`PROGRESS_SECONDS` with the same figures, so the Prefect UI shows life without flooding it.
Thread-safe: the shard threads of batch prediction advance one bar.

Every long loop reports progress, so progress is also where a loop stops on request: after
`request_stop` (the CLI calls it on Ctrl-C or SIGTERM), the next `advance` in any thread raises
`Stopped` instead of working on for minutes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

PROGRESS_SECONDS = 15  # off a terminal, at most one progress line this often (a log, the Prefect UI)
_active: dict[str, Progress] = {}  # by key, for tasks that get only a key (see `find`)
_active_lock = threading.Lock()
_stop = threading.Event()
_stop_reason: list[str] = []


class Stopped(BaseException):
    """A loop stopped on request. A BaseException, like KeyboardInterrupt: a per-file `except Exception`
    must not swallow it, and Prefect does not retry it."""


def request_stop(reason: str) -> None:
    """Ask every long loop in this process to stop at its next progress step, e.g. "SIGINT"."""
    if not _stop.is_set():
        _stop_reason.append(reason)
        _stop.set()


def stop_requested() -> str | None:
    """Why a stop was requested (the `request_stop` reason), or None."""
    return _stop_reason[0] if _stop.is_set() else None


def check_stop() -> None:
    """Raise `Stopped` when a stop was requested."""
    if _stop.is_set():
        raise Stopped(f"stopped by {_stop_reason[0]}")


def on_terminal() -> bool:
    """Whether a person watches stderr (a TTY that can redraw a bar)."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Progress:
    """Counts work done out of a total; shows it as a bar on a terminal, as rate-limited log lines elsewhere.

    Args:
        description: What is counted, e.g. "decoding train images"; `advance` may change it.
        total: How much there is (may grow with `add_total`).
        unit: The counted thing, plural ("files", "images", "steps").
        log: Where the lines go off a terminal.
        terminal: Draw a bar (default: when stderr is a terminal).
        every: Seconds between log lines (default `PROGRESS_SECONDS`, read when the loop starts).
    """

    def __init__(
        self,
        description: str,
        total: int,
        unit: str,
        log: Callable[[str], None],
        terminal: bool | None = None,
        every: float | None = None,
    ):
        self.description, self.total, self.unit, self.log = description, total, unit, log
        self.every = PROGRESS_SECONDS if every is None else every
        self.done = 0
        self.started = self.last_line = time.perf_counter()
        self._lock = threading.Lock()
        self._bar = self._task = None
        if on_terminal() if terminal is None else terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(f"{{task.fields[rate]}} {unit}/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,  # the log lines stay; the bar goes when the loop ends
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, rate="-")

    def advance(self, count: int = 1, description: str | None = None) -> None:
        """Count `count` more done, optionally under a new description.

        Raises:
            Stopped: A stop was requested (see `request_stop`).
        """
        check_stop()
        with self._lock:
            self.done += count
            if description is not None:
                self.description = description
            now = time.perf_counter()
            rate = self.done / (now - self.started) if now > self.started else 0.0
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done, description=self.description, rate=_rate(rate))
                return
            if now - self.last_line < self.every or self.done >= self.total:
                return  # the loop's own summary line says when it is done
            self.last_line = now
            left = (self.total - self.done) / rate if rate else float("inf")
        self.log(f"{self.description}: {self.done:,}/{self.total:,} {self.unit}, {_rate(rate)} {self.unit}/s, "
                 f"about {left:.0f}s left")  # fmt: skip

    def add_total(self, count: int) -> None:
        """Make the total `count` larger (work discovered while the loop runs)."""
        with self._lock:
            self.total += count
            if self._bar is not None:
                self._bar.update(self._task, total=self.total)

    def close(self) -> None:
        """Remove the bar (a log-only progress has nothing to remove)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rate(per_second: float) -> str:
    """Whole numbers, but two significant digits below 10: a 7-second step is 0.14 steps/s, not 0."""
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.2g}"


def register(key: str, progress: Progress) -> None:
    """Make `progress` findable by `key` in this process (until `unregister`)."""
    with _active_lock:
        _active[key] = progress


def unregister(key: str) -> None:
    with _active_lock:
        _active.pop(key, None)


def find(key: str | None) -> Progress | None:
    """The progress registered under `key` in this process; None elsewhere (a Dask worker) or without a key."""
    with _active_lock:
        return _active.get(key) if key else None
