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


UNLIKE_KINDS = ("noise", "flat", "ramp", "shaped_noise", "checkerboard", "text")  # non-photos, the six
WORDS = ("INVOICE", "Total", "page 3", "hello", "ERROR", "2026", "Q&A", "menu", "SALE", "notes")


def unlike_images(per_kind: int = 40, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-photos by kind (`UNLIKE_KINDS`, uint8 arrays): uniform noise; flat colours; two-colour ramps (left to
    right or diagonal); noise whose amplitude follows a ramp; checkerboards of two colours and 2-8 px squares;
    a word or two in a plain colour on a plain background."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    shapes = [ramp[None, :, None] + 0 * ramp[:, None, None], (ramp[None, :, None] + ramp[:, None, None]) / 2]
    images: dict[str, list] = {kind: [] for kind in UNLIKE_KINDS}
    for i in range(per_kind):
        low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        shape = shapes[i % 2]
        images["noise"].append(rng.integers(0, 256, (size, size, 3)))
        images["flat"].append(np.broadcast_to(low, (size, size, 3)))
        images["ramp"].append(low * (1 - shape) + high * shape)
        images["shaped_noise"].append(np.clip(low + shape * rng.normal(0, 90, (size, size, 3)), 0, 255))
        square = int(rng.integers(2, 9))
        cells = (np.arange(size)[:, None] // square + np.arange(size)[None, :] // square) % 2
        images["checkerboard"].append(np.where(cells[..., None] == 1, high, low))
        canvas = Image.new("RGB", (size, size), tuple(int(v) for v in low))
        ink = tuple(int(v) for v in (255 - low if np.abs(high - low).sum() < 150 else high))
        draw = ImageDraw.Draw(canvas)
        for line in range(1 + i % 2):
            word = WORDS[int(rng.integers(len(WORDS)))]
            draw.text((int(rng.integers(0, 6)), 2 + line * 13 + int(rng.integers(0, 4))), word, fill=ink)
        images["text"].append(np.asarray(canvas))
    return {kind: np.asarray(arrays).astype(np.uint8) for kind, arrays in images.items()}


def write_unlike_images(folder: Path, per_kind: int = 40) -> Path:
    """`unlike_images` as PNG files `<kind>_<i>.png` in `folder`."""
    folder.mkdir(parents=True)
    for kind, arrays in unlike_images(per_kind).items():
        for i, pixels in enumerate(arrays):
            Image.fromarray(pixels).save(folder / f"{kind}_{i:02d}.png")
    return folder


def write_upscaled_cifar(cifar_dir: Path, originals: Path, photos: Path, per_class: int = 30) -> tuple[Path, Path]:
    """The first `per_class` real CIFAR-10 test images of each class, as they are under `originals` and as
    640x480 JPEG "photos" (bicubic, quality 90) under `photos`, in class folders."""
    for class_dir in sorted((cifar_dir / "test").iterdir()):
        for root in (originals, photos):
            (root / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:per_class]:
            image = Image.open(path)
            image.save(originals / class_dir.name / path.name)
            image.resize((640, 480), Image.Resampling.BICUBIC).save(photos / class_dir.name / path.name, quality=90)
    return originals, photos
