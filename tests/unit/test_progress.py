"""Progress: a rich bar on a terminal, rate-limited log lines elsewhere, safe across threads."""

import os
import pty
import select
import sys
import threading
import time

import model_lib.progress
from model_lib.data import ingest
from model_lib.progress import Progress, find, register, unregister


def test_off_a_terminal_lines_carry_count_rate_and_time_left_at_a_bounded_rate():
    lines = []
    with Progress("decoding train images", 10, "files", lines.append, terminal=False, every=0.0) as progress:
        for _ in range(10):
            progress.advance()
    assert len(lines) == 9  # the tenth is the loop's own summary, not a progress line
    assert lines[0].startswith("decoding train images: 1/10 files, ") and lines[0].endswith("s left")
    quiet = []
    with Progress("x", 10, "files", quiet.append, terminal=False, every=3600.0) as progress:
        progress.advance(5)
    assert quiet == []


def test_slow_steps_show_a_rate_below_one_instead_of_zero(monkeypatch):
    lines, clock = [], iter([0.0, 7.0, 14.0])  # started, then one step every 7 s
    monkeypatch.setattr(model_lib.progress.time, "perf_counter", lambda: next(clock))
    with Progress("epoch 1/8", 25, "steps", lines.append, terminal=False, every=0.0) as progress:
        progress.advance()
        progress.advance()
    assert lines == ["epoch 1/8: 1/25 steps, 0.14 steps/s, about 168s left",
                     "epoch 1/8: 2/25 steps, 0.14 steps/s, about 161s left"]  # fmt: skip


def test_threads_advance_one_count_and_the_total_can_grow():
    progress = Progress("classifying images", 0, "images", lambda line: None, terminal=False)
    register("run-1", progress)
    try:
        assert find("run-1") is progress and find("run-2") is None and find(None) is None
        progress.add_total(4000)
        workers = [threading.Thread(target=lambda: [find("run-1").advance() for _ in range(1000)]) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert (progress.done, progress.total) == (4000, 4000)
    finally:
        unregister("run-1")
    assert find("run-1") is None


def _read_until(leader: int, text: str, seconds: float) -> str:
    """What the terminal got, read until `text` shows: the kernel hands pty output over in pieces, later under load."""
    drawn, deadline = "", time.monotonic() + seconds
    while text not in drawn and time.monotonic() < deadline:
        if select.select([leader], [], [], 0.1)[0]:
            drawn += os.read(leader, 1 << 16).decode(errors="replace")
    return drawn


def test_on_a_terminal_a_bar_is_drawn_and_no_lines_are_logged(monkeypatch):
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("TERM", "xterm")
    lines = []
    assert model_lib.progress.on_terminal()
    with Progress("decoding test images", 50, "files", lines.append, every=0.0) as progress:
        for _ in range(50):
            progress.advance()
    terminal.flush()
    drawn = _read_until(leader, "files/s", seconds=10)
    terminal.close()
    os.close(leader)
    assert lines == [] and "decoding test images" in drawn and "files/s" in drawn


def test_ingest_reports_decoding_progress(colour_dataset, artifacts, monkeypatch):
    monkeypatch.setattr(model_lib.progress, "PROGRESS_SECONDS", 0.0)
    lines = []
    ingest(str(colour_dataset), artifacts, log=lines.append)
    progress = [line for line in lines if line.startswith("decoding ") and " files, " in line]
    assert progress and progress[0].startswith("decoding train images: ")
