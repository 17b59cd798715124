"""Image folders generated at test time from data that ships with a package (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_TEST_COUNT = 360  # of scikit-learn's 1,797 digits; the other 1,437 train


def write_digits_dataset(root: Path, seed: int = 0) -> Path:
    """scikit-learn's bundled handwritten digits as 8x8 greyscale PNGs in `root/{train,test}/<digit>/`.

    10 classes, 1,437 train and 360 test images, split by a seeded shuffle. Greyscale, tiny and
    mostly flat background: the kind of user folder that CIFAR-10 never exercises.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    test = set(np.random.default_rng(seed).permutation(len(digits.target))[:DIGITS_TEST_COUNT].tolist())
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / ("test" if index in test else "train") / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255 / 16).astype(np.uint8), "L").save(folder / f"{index:04d}.png")
    return root


def write_scattered_digits_dataset(root: Path, canvas: int = 128, side: int = 16, seed: int = 0) -> Path:
    """scikit-learn's digits, each upscaled to `side` px and pasted at a random place on a `canvas`-px square of
    mild noise, as PNGs in `root/{train,test}/<digit>/` (the split of `write_digits_dataset`).

    At 32 px a digit shrinks to 4 px and its strokes blur away; at the canvas's own size they stay: a folder
    whose accuracy depends on the image size the model sees.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    test = set(rng.permutation(len(digits.target))[:DIGITS_TEST_COUNT].tolist())
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        image = rng.normal(40, 12, (canvas, canvas)).clip(0, 255)
        glyph = np.kron(pixels * 255 / 16, np.ones((side // 8, side // 8)))
        top, left = rng.integers(0, canvas - side + 1, 2)
        window = image[top : top + side, left : left + side]
        window[:] = np.maximum(window, glyph)
        folder = root / ("test" if index in test else "train") / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.astype(np.uint8), "L").save(folder / f"{index:04d}.png")
    return root


def write_hues_dataset(root: Path, classes: int = 12, train_per_class: int = 6, test_per_class: int = 3) -> Path:
    """More than 10 classes, few images each, non-square (48x30) RGB: a hue per class plus noise."""
    import colorsys

    rng = np.random.default_rng(1)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in range(classes):
            folder = root / split / f"hue{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array(colorsys.hsv_to_rgb(label / classes, 0.9, 0.9)) * 255
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 8, (30, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=95)
    return root


def write_uninformative_dataset(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    """Classes that hold the same `per_class` noise pictures: nothing to learn, by construction.

    Noise rather than one flat picture: a batch of identical images has zero variance, and batch
    norm's statistics then turn the slightest weight change into an exploding validation loss,
    which the divergence guard refuses before the learned-nothing guard this data is for.
    """
    pictures = np.random.default_rng(0).integers(0, 256, (per_class, 32, 32, 3), dtype=np.uint8)
    for split in ("train", "test"):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(pictures):
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root


def unlike_images(per_kind: int = 40, size: int = 32) -> dict[str, np.ndarray]:
    """Random noise, flat colours and smooth two-colour gradients (uint8 arrays by kind): unlike any photo."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)
    shapes = [ramp[None, :, None] + 0 * ramp[:, None, None], (ramp[None, :, None] + ramp[:, None, None]) / 2]
    images: dict[str, list] = {"noise": [], "flat": [], "gradient": []}
    for i in range(per_kind):
        low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        images["noise"].append(rng.integers(0, 256, (size, size, 3)))
        images["flat"].append(np.broadcast_to(low, (size, size, 3)))
        images["gradient"].append(low * (1 - shapes[i % 2]) + high * shapes[i % 2])
    return {kind: np.asarray(arrays).astype(np.uint8) for kind, arrays in images.items()}


def write_unlike_images(folder: Path, per_kind: int = 40) -> Path:
    """`unlike_images` as PNG files `<kind>_<i>.png` in `folder`."""
    folder.mkdir(parents=True)
    for kind, arrays in unlike_images(per_kind).items():
        for i, pixels in enumerate(arrays):
            Image.fromarray(pixels).save(folder / f"{kind}_{i:02d}.png")
    return folder
