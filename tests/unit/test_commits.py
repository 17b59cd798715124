"""The commit convention of CONTRIBUTING.md holds for every commit since that file was added."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBJECT_MAX = 72  # characters, CONTRIBUTING.md


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_every_commit_since_the_convention_has_a_short_subject_and_a_body():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI runs on a clone: git and its history must be there")
        pytest.skip("not a git checkout")
    added = git("log", "--diff-filter=A", "--format=%H", "--", "CONTRIBUTING.md").split()
    assert added, "CONTRIBUTING.md is not in the history"
    log = git("log", "--format=%H%x00%B%x01", f"{added[-1]}^..HEAD")
    wrong = []
    for entry in filter(str.strip, log.split("\x01")):
        commit, message = entry.strip().split("\x00", 1)
        lines = message.strip().splitlines()
        subject, rest = lines[0], lines[1:]
        if len(subject) > SUBJECT_MAX or not rest or rest[0].strip() or not any(line.strip() for line in rest):
            wrong.append(f"{commit[:7]} {subject[:80]}")
    assert wrong == [], "subject over 72 characters, or no blank line and body after it"
