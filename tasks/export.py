"""The optional last task of train-cifar: TFLite exports beside the registered version."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from model_lib.export import export_version
from model_lib.settings import work_dir
from tasks.common import log_info


@task(name="export")
def export_task(version_dir: str) -> list[dict]:
    """Write float32, float16 and int8 TFLite models, each with its interpreter-measured test accuracy."""
    return export_version(Path(version_dir), work_dir(), log=log_info)
