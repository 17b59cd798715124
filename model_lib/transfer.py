"""Transfer learning: a Keras Applications backbone under a new head, trained in two phases.

Images smaller than the backbone's smallest ImageNet resolution are upscaled inside the model (and the
backbone's own preprocessing is kept), so the saved model still takes raw RGB pixels 0-255 at the run's
image size like every other architecture here; larger ones go in as they are.
"""

from __future__ import annotations

from pathlib import Path

from model_lib.config import option

BACKBONE_INPUT_SIDE = 96  # pixels: MobileNetV3Small's smallest ImageNet resolution; smaller images are resized up to it
HEAD_DROPOUT = 0.2  # dropout before the new classifier
WEIGHTS_SIGNATURES = (b"\x89HDF\r\n\x1a\n",)  # how every file Keras' load_weights reads begins (HDF5)
BACKBONE_LAYER_NAME = "backbone"


def weights_help() -> str:
    """What to do about ImageNet weights that cannot be had, naming the option as the one who asked does."""
    return (
        "download the no-top MobileNetV3Small ImageNet weights on a connected machine "
        "(keras.applications.MobileNetV3Small(include_top=False, weights='imagenet') caches them under "
        f"~/.keras/models/), copy the .h5 file here and pass {option('weights')} /path/to/that.h5, or use "
        f"{option('weights')} none"
    )


class TransferWeightsError(ValueError):
    """The requested backbone weights cannot be had (offline download, missing file)."""


def from_scratch(weights: str | None) -> bool:
    """Whether the `weights` setting asks for no pretrained backbone weights."""
    return weights in ("none", "", None)


def backbone_weights(weights: str) -> str | None:
    """Map the `weights` setting to Keras Applications' argument.

    Raises:
        TransferWeightsError: `weights` is a path that does not exist.
    """
    if from_scratch(weights):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TransferWeightsError(f"{path}: weights file not found; {weights_help()}")
    with open(path, "rb") as file:
        head = file.read(max(map(len, WEIGHTS_SIGNATURES)))
    if not head.startswith(WEIGHTS_SIGNATURES):  # a photo or a text file: said without loading Keras
        raise TransferWeightsError(f"{path}: not a Keras weights file (HDF5 .h5 or .weights.h5); {weights_help()}")
    return str(path)


def loads_weights_file(weights: str | None) -> bool:
    """Whether checking `weights` means loading a file into Keras; every other mistake is said without Keras."""
    try:
        return backbone_weights(weights) not in (None, "imagenet")
    except TransferWeightsError:
        return False


def imagenet_weights_note() -> str:
    """Where `--weights imagenet` comes from on this run: Keras' cache, or a download into it (once)."""
    import keras

    folder = Path(keras.src.backend.config.keras_home()) / "models"
    cached = sorted(folder.glob("weights_mobilenet_v3_small_224_1.0_float_no_top*.h5"))
    if cached:
        return f"ImageNet weights for the backbone from Keras' cache: {cached[0]}"
    return f"ImageNet weights for the backbone: downloading once into Keras' cache, {folder} (about 4 MB)"


def transfer_logits(inputs, num_classes: int, policy: str, weights: str = "none"):
    """MobileNetV3Small (ImageNet preprocessing included) on upscaled inputs, then a new linear head."""
    import keras
    from keras import layers

    side = max(BACKBONE_INPUT_SIDE, inputs.shape[1])
    x = layers.Resizing(side, side, dtype=policy)(inputs) if side != inputs.shape[1] else inputs
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)  # Applications models take the global policy
    try:
        backbone = keras.applications.MobileNetV3Small(
            input_shape=(side, side, 3),
            include_top=False,
            weights=backbone_weights(weights),
            include_preprocessing=True,
            pooling="avg",
        )
    except TransferWeightsError:
        raise
    except Exception as error:  # the download raises whatever urllib raises
        if weights == "imagenet":
            raise TransferWeightsError(f"could not download the ImageNet weights ({error}); {weights_help()}") from None
        raise TransferWeightsError(f"{weights}: cannot load these weights into MobileNetV3Small ({error})") from None
    finally:
        keras.config.set_dtype_policy(previous_policy)
    backbone.name = BACKBONE_LAYER_NAME
    x = backbone(x)
    x = layers.Dropout(HEAD_DROPOUT, dtype=policy)(x)
    return layers.Dense(num_classes, dtype=policy)(x)


def freeze_backbone(model, trainable_top_layers: int) -> int:
    """Freeze the backbone but its top `trainable_top_layers` layers (batch norm stays frozen).

    Returns:
        How many backbone layers are trainable now.
    """
    from keras import layers

    backbone = model.get_layer(BACKBONE_LAYER_NAME)
    backbone.trainable = trainable_top_layers > 0
    first_trainable = len(backbone.layers) - trainable_top_layers
    count = 0
    for index, layer in enumerate(backbone.layers):
        # Frozen batch norm keeps the pretrained statistics; fine-tuning them on few images hurts.
        layer.trainable = index >= first_trainable and not isinstance(layer, layers.BatchNormalization)
        count += layer.trainable
    return count
