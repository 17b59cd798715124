"""The unsure flags of a prediction: `out_of_distribution`, `low_confidence` or `ok`.

* `out_of_distribution`: the image's texture (mean absolute difference between neighbouring
  pixels, 0-255, on the pixels the model sees) is outside the range of 99.6% of the training
  images (random noise lies above it, flat colours and smooth gradients below it), or what the
  network computes from it lies far from every class (`model_lib.ood`);
* `low_confidence`: the calibrated top-1 probability is below the model's threshold (chosen by
  `model_lib.calibrate` on the validation split).
"""

from __future__ import annotations

import numpy as np

TEXTURE_QUANTILES = (0.002, 0.998)  # training images' texture range kept in-distribution: 99.6% of them
TEXTURE_SAMPLE = 20_000  # training images the texture range is measured on


def texture(images: np.ndarray) -> np.ndarray:
    """Per image: the mean absolute difference between horizontally and vertically neighbouring pixel values."""
    x = np.asarray(images, np.float32)
    return (np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))) / 2


def texture_range(train_images: np.ndarray) -> list[float]:
    """The texture range of `TEXTURE_QUANTILES` of the training images: outside it, an image is not like them.

    Measured on `TEXTURE_SAMPLE` images spread evenly over the whole array: the cached training images
    are stored class by class, and the first 20,000 of CIFAR-10's are four of its ten classes.
    """
    count = len(train_images)
    sample = np.unique(np.linspace(0, count - 1, min(count, TEXTURE_SAMPLE)).astype(int))
    # A chunk at a time: as float32, 20,000 images of 128 px would take 4 GB at once.
    values = np.concatenate([texture(train_images[chunk]) for chunk in np.array_split(sample, -(-len(sample) // 1000))])
    return [round(float(q), 4) for q in np.quantile(values, TEXTURE_QUANTILES)]


def flags(
    probabilities: np.ndarray, pixels: np.ndarray, unsure_below: float | None, textures, outside=None
) -> list[str]:
    """Each prediction's flag: `out_of_distribution`, `low_confidence` or `ok`; "" where the model has no rule.

    `outside`: per image, whether its features lie beyond the model's feature rule (`model_lib.ood`), or None.
    """
    if unsure_below is None or textures is None:
        return [""] * len(probabilities)
    low, high = textures
    image_texture = texture(pixels)
    unlike = (image_texture < low) | (image_texture > high)
    if outside is not None:
        unlike |= np.asarray(outside, bool)
    confidence = probabilities.max(axis=1)
    return [
        "out_of_distribution" if u else "low_confidence" if c < unsure_below else "ok"
        for u, c in zip(unlike.tolist(), confidence.tolist(), strict=True)
    ]
