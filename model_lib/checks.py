"""Checks of a request before any work starts, shared by the CLI (before Prefect starts) and the flows."""

from __future__ import annotations

from pathlib import Path

from model_lib.config import TrainConfig, resolve_config
from model_lib.fileio import check_writable
from model_lib.settings import REGISTRY_FOLDER, default_data_source, is_url, work_dir


def check_training_request(profile: str, overrides: dict, artifacts_root: Path) -> TrainConfig:
    """The run's configuration, after checking every option, the data folder and the registry.

    Raises:
        ConfigError: An option no run can use.
        DatasetError: The data folder is missing or has neither known layout.
        RegistryError: An invalid model name, or a corrupt registry to register into.
        NotWritable: The registry's or the work folder's disk location cannot be written.
    """
    from model_lib.data import resolve_source
    from model_lib.registry import Registry

    config = resolve_config(profile, **{**overrides, "data": overrides.get("data") or default_data_source()})
    resolve_source(config.data)
    if config.model_name:
        Registry(artifacts_root, config.model_name).state()
    if not is_url(artifacts_root):
        check_writable(Path(artifacts_root) / REGISTRY_FOLDER, "the model registry (ARTIFACTS_DIR)")
    check_writable(work_dir(), "the work folder (runs and caches)")
    return config
