"""The lock file is what runs: every install (`make install`, `.ci/run`) takes requirements.lock, so the suite
tests exactly what a fresh install gets. These checks need no network."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version

import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

LOCK = REPO / "requirements.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PINNED = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked() -> dict[str, str]:
    """{name: version} of the lock's entries that apply to this interpreter and platform."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := PINNED.match(line):
            name, pinned, marker = match.groups()
            if marker is None or Marker(marker).evaluate():
                pins[canonicalize_name(name)] = pinned
    return pins


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and those of the extras `make install` installs."""
    extras = re.search(r"^EXTRAS := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1).split()
    groups = PYPROJECT["project"]["optional-dependencies"]
    return [Requirement(text) for text in PYPROJECT["project"]["dependencies"] + sum((groups[e] for e in extras), [])]


def test_this_environment_is_the_locked_set():
    pins = locked()
    assert len(pins) > 100, "requirements.lock lost its entries"
    differs = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            differs[name] = (pinned, installed)
    assert differs == {}, f"installed differs from requirements.lock (run `make install`): {differs}"


def test_the_lock_satisfies_every_declared_range():
    """A range edited in pyproject.toml without `make lock` fails here, before anything installs it."""
    pins = locked()
    unmet = [str(r) for r in declared() if not r.specifier.contains(pins.get(canonicalize_name(r.name), "0"), True)]
    assert unmet == [], f"requirements.lock does not satisfy {unmet}: run `make lock`"


def test_sqlalchemy_stays_below_2_1_where_prefects_scheduler_fails():
    (sqlalchemy,) = [r for r in declared() if r.name.lower() == "sqlalchemy"]
    assert not sqlalchemy.specifier.contains("2.1.0") and sqlalchemy.specifier.contains(locked()["sqlalchemy"])


def test_prefect_yaml_names_the_locked_prefect():
    assert yaml.safe_load((REPO / "prefect.yaml").read_text())["prefect-version"] == locked()["prefect"]
