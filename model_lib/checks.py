"""Checks of a request before any work starts, shared by the CLI (before Prefect starts) and the flows."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from model_lib.config import ConfigError, TrainConfig, option, resolve_config
from model_lib.fileio import check_writable
from model_lib.settings import REGISTRY_FOLDER, default_data_source, is_url, work_dir
from model_lib.transfer import BACKBONE_INPUT_SIDE, TransferWeightsError, backbone_weights, from_scratch

# Calibration and evaluation hold the validation and test images whole: at most this share of the memory.
EVALUATION_MEMORY_SHARE = 0.25


def check_training_request(profile: str, overrides: dict, artifacts_root: Path) -> TrainConfig:
    """The run's configuration, after checking every option, the data folder and the registry.

    Raises:
        ConfigError: An option no run can use.
        DatasetError: The data folder is missing or has neither known layout.
        RegistryError: An invalid model name, or a corrupt registry to register into.
        NotWritable: The registry's or the work folder's disk location cannot be written.
    """
    from model_lib.registry import Registry
    from model_lib.sources import resolve_source

    config = resolve_config(profile, **{**overrides, "data": overrides.get("data") or default_data_source()})
    check_weights(config.weights, config.architecture)
    resolve_source(config.data)
    if config.model_name:
        Registry(artifacts_root, config.model_name).state()
    if not is_url(artifacts_root):
        check_writable(Path(artifacts_root) / REGISTRY_FOLDER, "the model registry (ARTIFACTS_DIR)")
    check_writable(work_dir(), "the work folder (runs and caches)")
    return config


def check_weights(weights: str, architecture: str) -> None:
    """Refuse, before any data is read, backbone weights no run can use: weights for another architecture, a
    missing file, or a file whose arrays do not fit MobileNetV3Small without its top (loaded into one built at
    `BACKBONE_INPUT_SIDE` px: its weights are the same at every image size).

    Raises:
        ConfigError: Naming `--weights` and what is wrong.
    """
    if from_scratch(weights) or weights == "imagenet" and architecture == "transfer":
        return
    if architecture != "transfer":
        raise ConfigError(f"{option('weights')} applies to the transfer architecture only, not {architecture}")
    try:
        path = backbone_weights(weights)
    except TransferWeightsError as error:
        raise ConfigError(f"{option('weights')} {error}") from None
    import keras

    backbone = keras.applications.MobileNetV3Small(
        input_shape=(BACKBONE_INPUT_SIDE, BACKBONE_INPUT_SIDE, 3), include_top=False, weights=None, pooling="avg"
    )
    try:
        with warnings.catch_warnings():  # a misfit file warns once per layer before the error says it all
            warnings.simplefilter("ignore")
            backbone.load_weights(path)
    except Exception as error:  # h5py's and Keras' own types, for a file that is not weights or not these
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{option('weights')} {path}: does not fit MobileNetV3Small without its top ({reason})"
        ) from None


def check_evaluation_memory(side: int, held_images: int) -> None:
    """Refuse, right after ingest, an image size at which the validation and test images (calibration and
    evaluation hold them whole) would take more than `EVALUATION_MEMORY_SHARE` of this machine's memory.

    Raises:
        ConfigError: Naming `--image-size`, the images' size and the machine's memory.
    """
    need = held_images * side * side * 3
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > EVALUATION_MEMORY_SHARE * total:
        raise ConfigError(
            f"{option('image_size')} {side}: the {held_images:,} validation and test images take "
            f"{need / 2**30:.1f} GiB at {side} px, and calibration and evaluation hold them whole: more than "
            f"{EVALUATION_MEMORY_SHARE:.0%} of this machine's {total / 2**30:.0f} GiB (a smaller "
            f"{option('image_size')}, or {option('max_test_images')})"
        )
