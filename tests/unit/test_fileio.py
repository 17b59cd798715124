"""Crash-safe writes keep the umask's permissions, like any other tool's files."""

import os
import socket
import stat
import subprocess
import sys

import pytest

from model_lib.fileio import current_umask, owned_folder, remove_abandoned, write_json


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json(tmp_path / "registry.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "registry.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]  # no temporary file left


def test_a_killed_processs_work_folders_are_removed_and_live_ones_kept(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.csv.parts-0123abcd-{ended.stdout.strip()}@{socket.gethostname()}"
    elsewhere = tmp_path / ".out.csv.parts-0123abcd-1@another-host"
    for folder in (dead, elsewhere):
        folder.mkdir()
    mine = owned_folder(tmp_path, ".out.csv.parts-")
    assert remove_abandoned(tmp_path, ".out.csv.parts-") == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([elsewhere.name, mine.name])
