"""bench/RESULTS.md's commands still run as written, or their section says it is historical and where it ran.

Checked without running them (they take minutes to hours): each script exists, takes each option shown,
and each profile named is one `resolve_config` knows; a `cifar-pipeline` command has that subcommand and
options. A section that begins with HISTORICAL's line is skipped: its figures stand, its commands belong
to the commit it names.
"""

import re
from pathlib import Path

import pytest
import typer

from flows.cli import app
from model_lib.config import PROFILES

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "RESULTS.md"
ARCHIVE = ROOT / "bench" / "ARCHIVE.md"  # the superseded sections, each historical
HISTORICAL = re.compile(r"\*Historical: recorded at commit ([0-9a-f]{7,40})[,;.]")
SCRIPT = re.compile(r"\b(bench/[\w/]+\.(?:py|sh))\b(.*)")
CLI = re.compile(r"\bcifar-pipeline ([a-z][\w-]*)(?: ([a-z][\w-]*))?(.*)")


def sections(page: Path = RESULTS) -> list[tuple[str, str]]:
    """(heading, body) of each `## ` section."""
    parts = re.split(r"(?m)^## ", page.read_text())[1:]
    return [(part.splitlines()[0], part) for part in parts]


def commands(body: str) -> list[str]:
    """The shell lines of a section's code blocks and its inline code that names a script or the CLI, each
    cut at `;`, `&&`, `|` and comments, so every piece is one command."""
    found, in_block = [], False
    for line in body.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block:
            found.append(line.split(" # ")[0] if not line.lstrip().startswith("#") else line)
        else:
            found += re.findall(r"`([^`]*(?:bench/|cifar-pipeline )[^`]*)`", line)
    pieces = [piece for line in found for piece in re.split(r";|&&|\|", line)]
    return [piece for piece in pieces if "bench/" in piece or "cifar-pipeline" in piece]


def _profiles(options: str) -> list[str]:
    named = re.findall(r"--profiles? ([\w,]+)", options)
    runs = [run for runs in re.findall(r"--runs ([\w:.,-]+)", options) for run in runs.split(",")]
    named += [run.split(":")[1] for run in runs if ":" in run]  # bench/train_jax.py's DATA:PROFILE:...
    return [name for names in named for name in names.split(",")]


def problems(command: str) -> list[str]:
    found = []
    if script := SCRIPT.search(command):
        path, rest = ROOT / script[1], script[2]
        if not path.is_file():
            return [f"{script[1]} does not exist"]
        source = path.read_text()
        found += [f"{script[1]} takes no {option}" for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                  if f'"{option}"' not in source]  # fmt: skip
        modes = re.search(r"case \$MODE in\n\s*([\w |]+)\)", source)  # gpu_measure.sh's measurements
        if modes and (mode := re.match(r"\s+([a-z]+)\b", rest)) and mode[1] not in modes[1].split(" | "):
            found.append(f"{script[1]} has no measurement {mode[1]!r}")
        found += [f"profile {name!r} does not exist" for name in _profiles(rest) if name not in PROFILES]
    if cli := CLI.search(command):
        group = typer.main.get_command(app)
        sub = group.commands.get(cli[1])
        if sub is None:
            return [f"cifar-pipeline has no command {cli[1]!r}"]
        name, rest = f"cifar-pipeline {cli[1]}", cli[3]
        if hasattr(sub, "commands"):  # a group: models
            sub = sub.commands.get(cli[2] or "")
            if sub is None:
                return [f"{name} has no command {cli[2]!r}"]
            name = f"{name} {cli[2]}"
        else:
            rest = f" {cli[2] or ''}{rest}"
        options = {name for param in sub.params for name in param.opts + param.secondary_opts}
        found += [f"{name} takes no {option}" for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                  if option not in options]  # fmt: skip
        found += [f"profile {name!r} does not exist" for name in _profiles(rest) if name not in PROFILES]
    return found


@pytest.mark.parametrize("heading, body", sections(), ids=lambda value: value[:60] if len(value) < 200 else "")
def test_each_command_runs_today_or_its_section_is_historical(heading, body):
    first = next(line for line in body.splitlines()[1:] if line.strip())
    if HISTORICAL.match(first):
        return
    broken = [f"{command.strip()}: {problem}" for command in commands(body) for problem in problems(command)]
    assert not broken, "\n".join(broken)


def test_the_archive_holds_only_historical_sections():
    current = [heading for heading, body in sections(ARCHIVE)
               if not HISTORICAL.match(next(line for line in body.splitlines()[1:] if line.strip()))]  # fmt: skip
    assert sections(ARCHIVE) and current == []


def test_the_check_finds_what_it_is_for():
    assert problems(".venv/bin/python bench/train_speed.py --profiles muon,seed --artifacts x") == [
        "profile 'muon' does not exist"
    ]
    assert problems("python bench/predict_speed.py --modle x") == ["bench/predict_speed.py takes no --modle"]
    assert problems("python bench/gone.py") == ["bench/gone.py does not exist"]
    assert problems("bash bench/gpu_measure.sh long") == ["bench/gpu_measure.sh has no measurement 'long'"]
    assert problems("cifar-pipeline train --profile muon --jit") == [
        "cifar-pipeline train takes no --jit",
        "profile 'muon' does not exist",
    ]
    assert problems("cifar-pipeline models promote cifar10@v1 --reason x") == []
    assert problems("cifar-pipeline models promote v1 --to x") == ["cifar-pipeline models promote takes no --to"]
    assert problems("cifar-pipeline models demote x") == ["cifar-pipeline models has no command 'demote'"]
    assert problems("bench/train_jax.py --runs cifar:muonla:float32:1e-3") == ["profile 'muonla' does not exist"]
