"""Transfer learning offline: weights from a file, a clear error for ImageNet, two training phases."""

import keras
import numpy as np
import pytest

from model_lib.checks import check_weights
from model_lib.config import ConfigError, resolve_config
from model_lib.models import build_model
from model_lib.runs import read_history
from model_lib.train import train
from model_lib.transfer import BACKBONE_LAYER_NAME, TransferWeightsError
from tests.model.test_train import _prepare, epoch_summaries


def test_backbone_weights_load_from_a_local_file(tmp_path):
    source = build_model("transfer", 10).get_layer(BACKBONE_LAYER_NAME)
    path = tmp_path / "mobilenet_v3_small_notop.weights.h5"
    source.save_weights(path)
    loaded = build_model("transfer", 10, weights=str(path)).get_layer(BACKBONE_LAYER_NAME)
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_weights_file_is_checked_before_any_data_and_fits_every_image_size(tmp_path):
    path = tmp_path / "backbone.weights.h5"
    source = build_model("transfer", 10).get_layer(BACKBONE_LAYER_NAME)
    source.save_weights(path)
    check_weights(str(path), "transfer")
    model = build_model("transfer", 10, image_size=128, weights=str(path))  # 128 px go in as they are
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Resizing)]
    for a, b in zip(source.get_weights(), model.get_layer(BACKBONE_LAYER_NAME).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other.save_weights(tmp_path / "other.weights.h5")  # real weights, of another network
    with pytest.raises(ConfigError, match="other.weights.h5: does not fit MobileNetV3Small without its top"):
        check_weights(str(tmp_path / "other.weights.h5"), "transfer")
    (tmp_path / "text.weights.h5").write_bytes(b"not an HDF5 file")
    with pytest.raises(ConfigError, match=r"text.weights.h5: not a Keras weights file \(HDF5"):
        check_weights(str(tmp_path / "text.weights.h5"), "transfer")


def test_imagenet_offline_and_missing_files_explain_what_to_do(monkeypatch, tmp_path):
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(TransferWeightsError, match=r"could not download the ImageNet weights .* --weights /path/to"):
        build_model("transfer", 10, weights="imagenet")
    with pytest.raises(TransferWeightsError, match="weights file not found"):
        build_model("transfer", 10, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="transfer architecture only"):
        build_model("seed_cnn", 10, weights="imagenet")


@pytest.mark.backends
@pytest.mark.slow
def test_two_phases_frozen_head_then_fine_tuning(colour_dataset, artifacts, tmp_path):
    """A real fit of two epochs: the switch from the frozen backbone to fine-tuning happens inside training (the
    trainable layers and the learning rate change between phases), which nothing smaller reaches."""
    weights = tmp_path / "pretrained.weights.h5"
    build_model("transfer", 10).get_layer(BACKBONE_LAYER_NAME).save_weights(weights)
    config, dataset, split_path, run_dir = _prepare(
        colour_dataset, artifacts, architecture="transfer", epochs=2, head_epochs=1, fine_tune_layers=10,
        optimizer="adam", learning_rate=1e-3, lr_schedule="constant", weights=str(weights),
        learned_margin=-1.0,  # "pretrained" weights that are random: this checks the phases, not learning
    )  # fmt: skip
    assert resolve_config("default", architecture="transfer").weights == "none"
    lines = []
    result = train(config, dataset, split_path, run_dir, log=lines.append)
    assert any(line.startswith("Phase head: 0 backbone layers trainable") for line in lines)
    finetune = next(line for line in lines if line.startswith("Phase finetune"))
    assert 0 < int(finetune.split()[2]) <= 10 and "learning rate 0.0001" in finetune
    assert epoch_summaries(lines) == ["epoch 1/2", "epoch 2/2"]
    assert read_history(run_dir / "history.csv")["epoch"].tolist() == [0, 1] and result.epochs_run == 2
    assert not list(run_dir.glob("*.done.weights.h5"))  # finished: markers cleared

    import keras

    model = keras.saving.load_model(result.model_path, safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3)  # still raw 32x32 pixels in


def test_a_backbone_without_pretrained_weights_trains_whole_in_one_phase():
    from model_lib.train import training_phases

    phases = training_phases(resolve_config("smoke", architecture="transfer", weights="none", epochs=4))
    assert [(p.name, p.first_epoch, p.last_epoch, p.trainable_backbone_layers) for p in phases] == [
        ("train", 0, 4, None)
    ]
