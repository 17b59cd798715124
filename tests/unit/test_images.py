"""The shared decoder: what it accepts, what it refuses, and what it never does."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from model_lib.images import (
    ImageDecodeError,
    decode_files,
    decode_files_ahead,
    decode_files_in_pool,
    decode_rgb,
    walk_folder,
)
from tests.catalogue import bomb_png


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees to display
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    decoded, original, kind = decode_rgb(tmp_path / "rotated.jpg", None)
    assert original == (60, 20) and kind == "JPEG RGB"
    assert decoded[10, 5, 2] > 200 and decoded[10, 55, 0] > 200  # now blue on the left, red on the right


def test_alpha_is_composited_on_white_and_sixteen_bit_is_scaled(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert decode_rgb(tmp_path / "clear.png", None)[0].min() == 255
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert decode_rgb(tmp_path / "white16.png", None)[0].min() == 255


def test_large_jpeg_is_decoded_in_draft_mode_and_resized(tmp_path):
    Image.new("RGB", (4000, 3000), (10, 120, 250)).save(tmp_path / "big.jpg")
    decoded, original, _ = decode_rgb(tmp_path / "big.jpg", (32, 32))
    assert decoded.shape == (32, 32, 3) and original == (4000, 3000)
    assert np.abs(decoded.astype(int) - (10, 120, 250)).max() < 8


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_rgb(tmp_path / "bomb.png", (32, 32))


def test_walk_is_sorted_and_never_leaves_the_folder(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "dir.png").mkdir()
    for name in ("b.png", "a.png", "a/z.jpg", "notes.txt"):
        (root / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", root / "linked_dir")
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "c.png")
    os.symlink(root / "b.png", root / "d.png")  # inside: fine
    entries = [(e.relative_path, e.kind) for e in walk_folder(root)]
    assert entries == [
        ("a.png", "image"),
        ("a/z.jpg", "image"),
        ("b.png", "image"),
        ("c.png", "outside_link"),
        ("d.png", "image"),
        ("dir.png", "not_image"),
        ("linked_dir", "not_image"),
        ("notes.txt", "not_image"),
    ]  # fmt: skip  (linked_dir is counted as skipped, never followed)
    assert [e.relative_path for e in walk_folder(root, recursive=False)] == [
        "a.png", "b.png", "c.png", "d.png", "dir.png", "linked_dir", "notes.txt"
    ]  # fmt: skip


def test_decoding_in_pool_chunks_keeps_file_order_and_records_broken_files(tmp_path):
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (10 + i, 8), (30 * i, 0, 0)).save(path)
        paths.append(path)
    paths[3].write_bytes(b"not an image")
    in_process = decode_files(paths, 4)
    with ThreadPoolExecutor(2) as pool:
        for chunks in (
            decode_files_in_pool(paths, 4, pool, chunk_files=2),  # prediction's: all submitted at once
            decode_files_ahead(paths, 4, pool, chunk_files=2, ahead=1),
        ):  # ingest's: a chunk ahead
            chunks = list(chunks)
            pixels = np.concatenate([chunk.pixels for chunk in chunks])
            sizes, errors = [s for c in chunks for s in c.sizes], [e for c in chunks for e in c.errors]
            np.testing.assert_array_equal(pixels, in_process.pixels)
            assert sizes == in_process.sizes and errors == in_process.errors and len(chunks) == 4
    assert [bool(error) for error in errors] == [False, False, False, True, False, False, False]
    assert sizes[6] == (16, 8) and pixels[3].max() == 0 and pixels[6, 0, 0, 0] == 180


def test_an_unreadable_sub_folder_is_one_entry_and_the_walk_goes_on(tmp_path, monkeypatch):
    import os

    from model_lib.images import ENTRY_ERRORS

    root = tmp_path / "photos"
    for name in ("a/x.png", "locked/y.png", "z.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    scandir = os.scandir

    def refuse_locked(path):  # tests run as root, whom permission bits do not stop
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    entries = [(e.relative_path, e.kind) for e in walk_folder(root)]
    assert entries == [("a/x.png", "image"), ("locked", "unreadable_folder"), ("z.png", "image")]
    assert "cannot be read" in ENTRY_ERRORS["unreadable_folder"]
