"""The first task of prune-version: rank a registered version's channels and keep the best of them."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from model_lib.data import DatasetInfo
from model_lib.prune import prune_version
from model_lib.settings import work_dir
from tasks.common import log_info


@task(name="prune")
def prune_task(version_dir: str, keep: float, criterion: str, epochs: int | None) -> tuple[dict, DatasetInfo]:
    """The fine-tuning run's config (the version's own, with its `pruned` record) and the version's dataset."""
    return prune_version(Path(version_dir), work_dir(), keep, criterion, epochs, log=log_info)
