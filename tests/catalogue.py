"""A folder of broken and odd image files, built in code, for the batch-predict tests."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BROKEN = {  # file -> words its error must contain
    "broken/empty.jpg": "empty file",
    "broken/truncated.jpg": "truncated",
    "broken/truncated.png": "truncated",
    "broken/page.png": "not an image",
    "broken/noise.jpg": "not an image",
    "broken/bomb.png": "decompression bomb",
    "broken/outside_link.jpg": "outside the input folder",
    "broken/pipe.jpg": "not a regular file (a FIFO)",
    "broken/loop.jpg": "link loop",
    "broken/dangling.png": "link points nowhere",
}
ODD = {  # file -> (width, height) as stored
    "odd/grey.png": (40, 30),
    "odd/grey_alpha.png": (40, 30),
    "odd/rgba.png": (40, 30),
    "odd/palette.gif": (40, 30),
    "odd/cmyk.jpg": (40, 30),
    "odd/one_bit.png": (40, 30),
    "odd/sixteen_bit.png": (40, 30),
    "odd/exif_rotated.jpg": (60, 20),
    "odd/animated.gif": (32, 32),
    "odd/multipage.tiff": (32, 32),
    "odd/one_pixel.png": (1, 1),
    "odd/photo_6000x4000.jpg": (6000, 4000),
    "odd/strip_2000x3.png": (2000, 3),
    "odd/UPPER.JPG": (32, 32),
    'odd/name with spaces, commas, "quotes" and ünïcødé ✓.png': (32, 32),
}
SKIPPED = ["notes.txt", ".DS_Store", "folder.jpg", "odd/._grey.png"]  # ._: macOS's AppleDouble metadata


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header claims billions of pixels: must be refused before any allocation."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))  # fmt: skip


def build_catalogue(root: Path, outside: Path) -> Path:
    """Write the catalogue under `root` (and one target file under `outside`)."""
    rng = np.random.default_rng(0)
    for folder in ("broken", "odd", "folder.jpg"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    colour = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))

    (root / "broken/empty.jpg").write_bytes(b"")
    colour.save(root / "broken/full.jpg")
    data = (root / "broken/full.jpg").read_bytes()
    (root / "broken/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "broken/full.jpg").unlink()
    colour.save(root / "broken/full.png")
    data = (root / "broken/full.png").read_bytes()
    (root / "broken/truncated.png").write_bytes(data[: len(data) // 2])
    (root / "broken/full.png").unlink()
    (root / "broken/page.png").write_text("<!doctype html><html><body>not an image</body></html>")
    (root / "broken/noise.jpg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "broken/bomb.png").write_bytes(bomb_png())
    outside.mkdir(parents=True, exist_ok=True)
    small.save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "broken/outside_link.jpg")
    os.mkfifo(root / "broken/pipe.jpg")  # opening it would block the decoder for ever
    os.symlink("loop.jpg", root / "broken/loop.jpg")
    os.symlink(root / "broken/gone.png", root / "broken/dangling.png")

    colour.convert("L").save(root / "odd/grey.png")
    colour.convert("LA").save(root / "odd/grey_alpha.png")
    colour.convert("RGBA").save(root / "odd/rgba.png")
    colour.convert("P").save(root / "odd/palette.gif")
    colour.convert("CMYK").save(root / "odd/cmyk.jpg")
    colour.convert("1").save(root / "odd/one_bit.png")
    Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(root / "odd/sixteen_bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (60, 20), (250, 0, 0)).save(root / "odd/exif_rotated.jpg", exif=exif)
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "odd/animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(root / "odd/multipage.tiff", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (10, 200, 10)).save(root / "odd/one_pixel.png")
    Image.new("RGB", (6000, 4000), (30, 60, 200)).save(root / "odd/photo_6000x4000.jpg", quality=90)
    Image.new("RGB", (2000, 3), (90, 90, 90)).save(root / "odd/strip_2000x3.png")
    small.save(root / "odd/UPPER.JPG", format="JPEG")
    small.save(root / ODD_NAMES_SPECIAL)
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "odd/._grey.png").write_bytes(b"\0\5\x16\7AppleDouble header")
    return root


ODD_NAMES_SPECIAL = next(name for name in ODD if "spaces" in name)
