"""Every `cifar-pipeline` command the README and docs/ show parses against the CLI as written.

The slow ones also run as written in tests/flows/test_readme.py; this catches, in a second, a
renamed option, a removed command or a choice that no longer exists in any documented line.
"""

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app
from model_lib.config import CHOICES, ENGINES, PROFILES

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHOICE_OPTIONS = {"--profile": tuple(PROFILES), "--engine": ENGINES, **{f"--{k}": v for k, v in CHOICES.items()}}


def documented_commands() -> list[tuple[str, list[str]]]:
    """`(where, arguments after cifar-pipeline)` for each command line in a fenced block."""
    found = []
    for document in DOCUMENTS:
        fenced = False
        for number, line in enumerate(document.read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
            elif fenced and re.match(r"^(\w+=\S+ )*cifar-pipeline ", line):
                words = shlex.split(line, comments=True)
                start = words.index("cifar-pipeline")
                found.append((f"{document.relative_to(ROOT)}:{number}", words[start + 1 :]))
    return found


COMMANDS = documented_commands()


def test_a_mistyped_command_or_option_fails_here():
    with pytest.raises(AssertionError):
        test_documented_command_parses("x", ["predict", "x", "--engin", "keras"])
    with pytest.raises(AssertionError):
        test_documented_command_parses("x", ["models", "lst"])
    with pytest.raises(AssertionError):
        test_documented_command_parses("x", ["train", "--profile", "fastest"])


def test_the_documents_show_every_command():
    shown = {arguments[0] for _, arguments in COMMANDS}
    assert shown == set(typer.main.get_command(app).commands)


@pytest.mark.parametrize(("where", "arguments"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, arguments):
    # --help last: every command and option before it must exist (else exit 2), and nothing runs.
    result = CliRunner().invoke(app, [*arguments, "--help"])
    assert result.exit_code == 0, f"{where}: {result.output[-500:]}"
    for option, value in zip(arguments, arguments[1:], strict=False):
        if option in CHOICE_OPTIONS:
            assert value in CHOICE_OPTIONS[option], f"{where}: {option} {value}"
