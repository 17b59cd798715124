"""Run folders: identical live runs get their own; a dead run's folder is resumed."""

import os
import socket
import subprocess
import sys

from model_lib.runs import OWNER_FILE, claim_run_dir, release_run_dir


def test_a_live_twin_gets_a_fresh_folder_and_a_dead_ones_folder_is_resumed(tmp_path):
    first = claim_run_dir(tmp_path, "abc")
    assert first == tmp_path / "abc"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (first / OWNER_FILE).write_text(f"{sleeper.pid}@{socket.gethostname()}")  # a live identical run
        twin = claim_run_dir(tmp_path, "abc")
        assert twin != first and twin.name.startswith("abc-")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert claim_run_dir(tmp_path, "abc") == first  # its owner died: resume there
    (first / OWNER_FILE).write_text("1@another-host")
    assert claim_run_dir(tmp_path, "abc") != first  # another machine's run: never taken over


def test_a_finished_run_releases_its_folder(tmp_path):
    folder = claim_run_dir(tmp_path, "abc")
    assert (folder / OWNER_FILE).read_text() == f"{os.getpid()}@{socket.gethostname()}"
    release_run_dir(folder)
    assert not (folder / OWNER_FILE).exists() and claim_run_dir(tmp_path, "abc") == folder
