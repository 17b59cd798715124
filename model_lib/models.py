"""Architectures by name. Every model takes raw RGB pixels 0-255 and returns class probabilities.

Normalisation lives inside the model, so any consumer can feed decoded images as they are. Models
are built only from stock Keras layers, so a saved `.keras` file loads with `safe_mode=True` in a
process that never imported this package.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import numpy as np

from model_lib.config import option
from model_lib.transfer import from_scratch, transfer_logits

CIFAR_MEAN = (125.3, 123.0, 113.9)  # per-channel pixel mean of CIFAR-10's training set, 0-255
CIFAR_STD = (63.0, 62.1, 66.7)  # per-channel pixel standard deviation, 0-255
WHITEN_EPSILON = 5e-4  # added to the patch covariance's eigenvalues before the inverse square root
WHITEN_SAMPLE_IMAGES = 5000  # training images build_model derives data-dependent layers (whitening) from
WHITEN_CHUNK_IMAGES = 500  # images whose patches are in memory at once while the whitening is fitted
# Whitened patch components kept: all 12 of airbench's 2x2 patches; 48 (every one of a 4x4 patch, 128 px) at most,
# so a large image's first layer stays near a CIFAR one's cost.
WHITEN_COMPONENTS = 48
AIRBENCH_BODY_SIDE = 32  # pixels per side: airbench's conv groups run at 1-2x this whatever the image size
AIRBENCH_WIDTHS = (64, 256, 256)  # channels of the three conv groups
# Weight on the old statistic. airbench's is 0.6 (it hands PyTorch 1 - 0.6, PyTorch's weight on the
# new one); 0.4 follows the weights faster and is what every figure of bench/RESULTS.md was measured with.
AIRBENCH_BN_MOMENTUM = 0.4
# airbench uses 1e-12. Near-constant channels (flat backgrounds, greyscale images) then amplify
# their gradients by up to 1/sqrt(epsilon) and their conv kernels grow without bound. Batch norm
# undoes the scale only in exact arithmetic: with 1e-5, scikit-learn's digits trained to 10% in
# bf16 on a CPU and in float32 on an H200; with 1e-3, 99% in every precision (bench/RESULTS.md).
AIRBENCH_BN_EPSILON = 1e-3
AIRBENCH_LOGIT_SCALE = 1 / 9  # airbench's temperature on the head's logits
TTA_FLIP, TTA_TRANSLATE = "flip_tta", "flip_translate_tta"  # names of a TTA wrapper's Average layer
FEATURE_PREFIX = "ood_"  # the pooling layers `with_features` adds to read a stage's features


def build_model(
    architecture: str,
    num_classes: int,
    image_size: int = 32,
    dtype_policy: str = "float32",
    calibration_images: np.ndarray | None = None,
    weights: str = "none",
    width: float = 1.0,
    seed: int | None = None,
    channels: tuple[int, ...] | None = None,
):
    """Build an architecture by name.

    Args:
        architecture: A key of `ARCHITECTURES`.
        num_classes: Width of the softmax.
        image_size: Input side in pixels.
        dtype_policy: Keras dtype policy for every layer but the float32 softmax.
        calibration_images: A sample of training images (uint8, NHWC) some architectures derive
            their input statistics from; fixed CIFAR statistics are used without it.
        weights: Pretrained backbone weights for `transfer`: "imagenet", a local file or "none".
        width: Multiplier on `airbench`'s channel widths.
        seed: Seeds the initial weights, whatever other threads of the process draw meanwhile.
        channels: `airbench`'s width conv by conv (two per group), in place of `width`: a pruned network's
            (`model_lib.prune`).

    Returns:
        An uncompiled `keras.Model`.

    Raises:
        ValueError: Unknown architecture, or weights asked of one without a pretrained backbone.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    import keras

    if not from_scratch(weights) and architecture != "transfer":
        raise ValueError(f"{option('weights')} applies to the transfer architecture only, not {architecture}")
    with _keras_seeds_from(seed):
        inputs = keras.Input((image_size, image_size, 3), name="pixels")
        logits = ARCHITECTURES[architecture](
            inputs, num_classes, dtype_policy, calibration_images, weights, channels or width
        )
        outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
        return keras.Model(inputs, outputs, name=architecture)


@contextlib.contextmanager
def _keras_seeds_from(seed: int | None) -> Iterator[None]:
    """Keras seeds each unseeded initializer and random layer from Python's process-wide `random`,
    which other threads draw from too: under load, Prefect's background workers drew between
    `set_random_seed` and the model's construction, and two `--deterministic` runs started from
    different weights. Inside this block Keras draws from a generator of its own instead."""
    from keras.src.random import seed_generator  # make_default_seed, Keras' one draw from `random`

    shared = getattr(seed_generator, "python_random", None)
    if seed is None or shared is None:  # a Keras without it: CI's determinism tests would say so
        yield
        return
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


def _seed_cnn(inputs, num_classes: int, policy: str, calibration_images, weights, width) -> object:
    """The origin notebook's CNN, layer for layer: 161,098 parameters for 10 classes."""
    from keras import layers

    x = layers.Rescaling(1 / 255, dtype=policy)(inputs)
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, activation="relu", dtype=policy)(x)
        x = layers.BatchNormalization(dtype=policy)(x)
        x = layers.MaxPooling2D(dtype=policy)(x)
    x = layers.Flatten(dtype=policy)(x)
    x = layers.Dense(128, activation="relu", dtype=policy)(x)
    x = layers.Dropout(0.5, dtype=policy)(x)
    return layers.Dense(num_classes, dtype=policy)(x)


def patch_whitening_kernel(images: np.ndarray, patch: int = 2, stride: int = 1) -> np.ndarray:
    """A conv kernel that whitens `patch`x`patch` pixel patches (airbench's frozen first layer).

    The covariance is taken over the patches the conv sees (every `stride` pixels), summed a few images at a
    time so large patches fit in memory. Above `WHITEN_COMPONENTS`, only that many leading components are kept.

    Returns a `(patch, patch, 3, 2 * components)` kernel: each eigenvector of the patch covariance scaled by
    its inverse square root eigenvalue, and its negation (components = `patch * patch * 3`, or at most
    `WHITEN_COMPONENTS`).
    """
    dims = patch * patch * 3
    total, outer, count = np.zeros(dims), np.zeros((dims, dims)), 0
    for start in range(0, len(images), WHITEN_CHUNK_IMAGES):
        x = np.asarray(images[start : start + WHITEN_CHUNK_IMAGES], np.float32)
        x = (x - np.array(CIFAR_MEAN, np.float32)) / np.array(CIFAR_STD, np.float32)
        h, w = (x.shape[1] - patch) // stride + 1, (x.shape[2] - patch) // stride + 1
        offsets = [(i, j) for i in range(patch) for j in range(patch)]
        patches = np.stack([x[:, i : i + stride * h : stride, j : j + stride * w : stride] for i, j in offsets], 3)
        flat = patches.reshape(-1, dims).astype(np.float64)
        total, outer, count = total + flat.sum(0), outer + flat.T @ flat, count + len(flat)
    mean = total / count
    covariance = (outer - count * np.outer(mean, mean)) / (count - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues[-WHITEN_COMPONENTS:], eigenvectors[:, -WHITEN_COMPONENTS:]
    filters = eigenvectors / np.sqrt(eigenvalues + WHITEN_EPSILON)
    kernel = filters.T.reshape(-1, patch, patch, 3).transpose(1, 2, 3, 0)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def airbench_stride(image_size: int | None) -> int:
    """The first layer's stride: images larger than CIFAR's are cut into `stride`-pixel patches, so the conv
    groups always run at 32-63 px (the cost of a CIFAR image) while each patch keeps all its pixels in its
    whitened channels."""
    return max(1, (image_size or 0) // AIRBENCH_BODY_SIDE)  # None: any size, as a crop-trained model takes


def _airbench(inputs, num_classes: int, policy: str, calibration_images, weights, width) -> object:
    """airbench94's network in Keras: frozen patch whitening, three conv groups, scaled linear head.

    At 32-63 px the whitening takes 2x2 patches at every pixel, as airbench does; larger images are cut into
    non-overlapping patches of `airbench_stride` pixels, whitened the same way.
    """
    from keras import layers

    stride = airbench_stride(inputs.shape[1])
    patch = 2 if stride == 1 else stride
    components = min(WHITEN_COMPONENTS, patch * patch * 3)
    x = layers.Normalization(mean=CIFAR_MEAN, variance=np.square(CIFAR_STD), dtype=policy)(inputs)
    whiten = layers.Conv2D(2 * components, patch, strides=stride, dtype=policy, trainable=False, name="whiten")
    x = whiten(x)
    if calibration_images is not None:
        whiten.kernel.assign(patch_whitening_kernel(calibration_images[:WHITEN_SAMPLE_IMAGES], patch, stride))
    x = layers.Activation("gelu", dtype=policy)(x)
    convs = iter(airbench_channels(width))
    for _ in AIRBENCH_WIDTHS:
        x = _identity_initialised_conv(x, next(convs), policy)
        x = layers.MaxPooling2D(dtype=policy)(x)
        for second in (False, True):
            if second:
                x = _identity_initialised_conv(x, next(convs), policy)
            x = layers.BatchNormalization(
                momentum=AIRBENCH_BN_MOMENTUM, epsilon=AIRBENCH_BN_EPSILON, scale=False, dtype=policy
            )(x)
            x = layers.Activation("gelu", dtype=policy)(x)
    x = layers.GlobalMaxPooling2D(dtype=policy)(x)
    x = layers.Dense(num_classes, use_bias=False, dtype=policy)(x)
    return layers.Rescaling(AIRBENCH_LOGIT_SCALE, dtype=policy)(x)


def airbench_channels(width: float | tuple[int, ...]) -> tuple[int, ...]:
    """airbench's channels conv by conv, two per group: `AIRBENCH_WIDTHS` times a width multiplier (at least 8), or
    the given widths (a pruned network's)."""
    if isinstance(width, (tuple, list)):
        if len(width) != 2 * len(AIRBENCH_WIDTHS):
            raise ValueError(f"airbench takes {2 * len(AIRBENCH_WIDTHS)} conv widths, not {len(width)}")
        return tuple(int(channels) for channels in width)
    return tuple(max(8, round(base * width)) for base in AIRBENCH_WIDTHS for _ in range(2))


def _identity_initialised_conv(x, channels: int, policy: str):
    """A 3x3 conv whose first filters start as the identity on the input channels (airbench's dirac init).

    Each such filter passes one input channel through unchanged, so a freshly built deep stack
    starts close to a shallow one and trains fast from the first steps.
    """
    from keras import layers

    conv = layers.Conv2D(channels, 3, padding="same", use_bias=False, dtype=policy)
    x = conv(x)
    kernel = np.array(conv.kernel.numpy())
    passed = min(kernel.shape[2], channels)
    kernel[..., :passed] = 0
    kernel[1, 1, np.arange(passed), np.arange(passed)] = 1
    conv.kernel.assign(kernel)
    return x


def _transfer(inputs, num_classes: int, policy: str, calibration_images, weights, width) -> object:
    """A pretrained MobileNetV3Small backbone under a new head (see model_lib.transfer)."""
    return transfer_logits(inputs, num_classes, policy, weights)


ARCHITECTURES: dict[str, Callable] = {"seed_cnn": _seed_cnn, "airbench": _airbench, "transfer": _transfer}


def tta_views(translate: bool = False) -> tuple[tuple[int, bool], ...]:
    """The views a TTA wrapper averages, as `(shift, mirrored)`, weights given by repetition.

    Flip TTA: the image and its mirror. With `translate`, airbench's evaluation: that pair at half
    the weight, plus the pairs seen through a window moved one pixel up-left (shift -1) and one
    down-right (+1), borders reflected, at a quarter each.
    """
    shifts = (0, 0, -1, 1) if translate else (0,)
    return tuple((shift, mirrored) for shift in shifts for mirrored in (False, True))


def _view_index(size: int, shift: int, mirrored: bool) -> np.ndarray:
    """For each output pixel along one axis, the input pixel it comes from (reflected at the borders)."""
    index = np.arange(size)[::-1] if mirrored else np.arange(size)
    index = index + shift
    return np.where(index < 0, -index, np.where(index >= size, 2 * (size - 1) - index, index))


def view_pixels(images: np.ndarray, shift: int, mirrored: bool) -> np.ndarray:
    """One TTA view of NHWC images, as the wrapper computes it."""
    rows = _view_index(images.shape[1], shift, False)
    return images[:, rows][:, :, _view_index(images.shape[2], shift, mirrored)]


def with_tta(model, translate: bool = False, own_view=None):
    """Wrap a model so it returns the weighted mean of its probabilities over `tta_views(translate)`.

    `own_view`: the same network with features as further outputs (`with_features`), to run
    the image's own view through; the wrapper then returns them after the probabilities. The other views
    run the plain network: computing features for them cost a flip-TTA model 30% of its speed.

    Each view is a fixed 0/1 `Dense` over the height and width axes (exact: each output pixel is
    one input pixel times 1.0), so the wrapper needs no custom or Lambda layer to load safely; the
    weights come from repeating the unshifted pair in a stock `Average`.
    """
    import keras
    from keras import layers

    height, width = model.input_shape[1:3]
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    outputs, rows = {}, {}
    for shift, mirrored in dict.fromkeys(tta_views(translate)):
        toward = {-1: ("up", "left"), 1: ("down", "right")}.get(shift)
        if shift not in rows:  # both views of a shift share its rows
            index = _view_index(height, shift, False)
            rows[shift] = _fixed_axis_map(inputs, index, 1, f"rows_{toward[0]}") if toward else inputs
        view = rows[shift]
        if toward or mirrored:
            name = f"cols_{toward[1]}" + ("_mirror" if mirrored else "") if toward else "mirror_width"
            view = _fixed_axis_map(view, _view_index(width, shift, mirrored), 2, name)
        outputs[shift, mirrored] = model(view) if own_view is None or (shift, mirrored) != (0, False) else None
    name = TTA_TRANSLATE if translate else TTA_FLIP
    if own_view is not None:  # the image itself through the network with features; they ride along
        own, *features = own_view(inputs)
        outputs[0, False] = own
        averaged = layers.Average(name=name)([outputs[view] for view in tta_views(translate)])
        return keras.Model(inputs, [averaged, *features], name=f"{model.name}_{name}")
    averaged = layers.Average(name=name)([outputs[view] for view in tta_views(translate)])
    return keras.Model(inputs, averaged, name=f"{model.name}_{name}")


def with_features(network, layers: tuple[str, ...] | list[str]):
    """`network` with its probabilities first, then each named layer's output as a vector: a 4-D one pooled by
    mean and by max over positions (stock Keras layers, so the copy needs no custom code)."""
    import keras
    from keras import layers as kl

    outputs = []
    for name in layers:
        tensor = network.get_layer(name).output
        if len(tensor.shape) == 4:
            mean = kl.GlobalAveragePooling2D(dtype="float32", name=f"{FEATURE_PREFIX}{name}_mean")(tensor)
            peak = kl.GlobalMaxPooling2D(dtype="float32", name=f"{FEATURE_PREFIX}{name}_max")(tensor)
            tensor = kl.Concatenate(dtype="float32", name=f"{FEATURE_PREFIX}{name}")([mean, peak])
        outputs.append(tensor)
    return keras.Model(network.inputs, [network.outputs[0], *outputs], name=f"{network.name}_features")


def served_with_features(model, layers: tuple[str, ...] | list[str]):
    """A served model (a TTA wrapper or a plain network) that also returns the features of `layers` for the
    image's own view (`with_features`), what `model_lib.ood`'s rule scores."""
    network, views = unwrap_tta(model)
    scored = with_features(network, layers)
    return with_tta(network, views == tta_views(translate=True), own_view=scored) if views else scored


def _fixed_axis_map(tensor, index: np.ndarray, axis: int, name: str):
    """`tensor` with its `axis` (1 = rows, 2 = columns) re-indexed by `index`, by a frozen 0/1 Dense."""
    from keras import layers

    order = (1, 3, 2) if axis == 2 else (2, 3, 1)  # the mapped axis last
    back = (1, 3, 2) if axis == 2 else (3, 1, 2)
    dense = layers.Dense(len(index), use_bias=False, trainable=False, name=name)
    mapped = layers.Permute(back)(dense(layers.Permute(order)(tensor)))
    kernel = np.zeros((len(index), len(index)), np.float32)
    kernel[index, np.arange(len(index))] = 1.0
    dense.kernel.assign(kernel)
    return mapped


def unwrap_tta(model):
    """`(the network that ends in the softmax, the views its TTA wrapper averages, or () without one)`."""
    import keras

    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(inner) != 1:
        return model, ()
    return inner[0], tta_views(translate=tta_translates(model))


def tta_translates(model) -> bool:
    """Whether a model's TTA wrapper (`with_tta`) averages translated views too, not only the flip."""
    return any(layer.name == TTA_TRANSLATE for layer in model.layers)


def network_parameter_count(model) -> int:
    """Parameters of the trained network: a TTA wrapper's fixed view matrices are not among them."""

    return int(unwrap_tta(model)[0].count_params())
