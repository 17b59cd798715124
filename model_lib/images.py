"""Safe image decoding and folder walking shared by training ingest and batch prediction.

Both paths decode through `decode_rgb`, so an image is preprocessed identically for training and
for prediction: first frame, EXIF orientation applied, alpha composited on white, 16-bit scaled
down, converted to RGB and resized with an antialiasing filter to the model's input size.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Pillow's resize filters (all but NEAREST) widen their support when shrinking, i.e. they antialias.
RESIZE_FILTER = Image.Resampling.BICUBIC
# JPEG draft decoding keeps at least this multiple of the target size, so the final resize still
# has real pixels to average instead of DCT-scaled ones only.
DRAFT_OVERSAMPLE = 2


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):  # fmt: skip
        if test(mode):
            return name
    return "a special file"


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions we decode (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit grey: Pillow's own RGB conversion clips at 255, so scale 0..65535 down first.
        values = np.asarray(image, dtype=np.float32)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def decode_rgb(
    path: str | os.PathLike | BinaryIO, size: tuple[int, int] | None, max_pixels: int | None = None
) -> tuple[np.ndarray, tuple[int, int], str]:
    """Decode an image file into RGB uint8 pixels.

    Args:
        path: The image file, or an upload held in memory (a binary file object; its `name`, if
            any, names it in errors).
        size: `(width, height)` to resize to, or None to keep the decoded size.
        max_pixels: Refuse an image with more pixels than this (read from the header, before any
            pixel is decoded); Pillow's own limit (about 179 million) applies in any case.

    Returns:
        The pixels as a `(height, width, 3)` uint8 array, the original `(width, height)`, and the
        file's format and mode as Pillow names them (`JPEG RGB`, `PNG P`, ...).

    Raises:
        ImageDecodeError: The file is empty, not an image, truncated, corrupt, or larger than
            Pillow's pixel limit (checked from the header, before any pixel is allocated).
    """
    source = path
    in_memory = not isinstance(path, (str, os.PathLike))
    path = str(getattr(path, "name", "") or "upload") if in_memory else Path(path)
    try:
        if in_memory:
            empty = source.seek(0, os.SEEK_END) == 0
            source.seek(0)
            if empty:
                raise ImageDecodeError(path, "empty file")
        else:
            status = path.stat()
            if not stat.S_ISREG(status.st_mode):  # a FIFO would block the decoder; a device never ends
                raise ImageDecodeError(path, f"not a regular file ({_file_kind(status.st_mode)})")
            if status.st_size == 0:
                raise ImageDecodeError(path, "empty file")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat that as the bomb it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                original_size, kind = image.size, f"{image.format} {image.mode}"
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise ImageDecodeError(
                        path, f"{image.width}x{image.height} is {image.width * image.height / 1e6:.1f} megapixels, "
                        f"over the limit of {max_pixels / 1e6:g}"
                    )  # fmt: skip
                if size is not None and image.format == "JPEG":
                    image.draft("RGB", (size[0] * DRAFT_OVERSAMPLE, size[1] * DRAFT_OVERSAMPLE))
                if "exif" in image.info or image.format == "TIFF":  # parsing EXIF costs a third of a small decode
                    image = ImageOps.exif_transpose(image)
                image = _to_rgb(image)
                if size is not None and image.size != tuple(size):
                    image = image.resize(size, RESIZE_FILTER, reducing_gap=3.0)
                return np.asarray(image, dtype=np.uint8), original_size, kind
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(path, f"decompression bomb refused ({error})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (format not recognised)") from None
    except PermissionError as error:
        raise ImageDecodeError(path, f"cannot be read ({error.strerror})") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ImageDecodeError(path, "link loop (the link points back at itself)") from None
        if error.errno == errno.ENOENT:
            raise ImageDecodeError(path, "gone (deleted, or a link that points nowhere)") from None
        raise ImageDecodeError(path, f"truncated or corrupt image ({error})") from None
    except (SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(path, f"truncated or corrupt image ({error})") from None


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """An image's `(width, height)` as its header says, without decoding pixels; None if unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def resize_pixels(images: np.ndarray, size: int) -> np.ndarray:
    """NHWC uint8 images resized to `size`x`size` with the decoder's filter (what a folder's files get)."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), RESIZE_FILTER, reducing_gap=3.0))
    return out


@dataclass(frozen=True)
class DecodedFiles:
    """Several files decoded to one size, in order; a file that failed keeps zero pixels and a reason."""

    pixels: np.ndarray
    """`(files, size, size, 3)` uint8."""
    sizes: list[tuple[int, int] | None]
    """Each file's original `(width, height)`; None where it failed."""
    kinds: list[str]
    """Each file's format and mode (`JPEG RGB`); "" where it failed."""
    errors: list[str]
    """"" where the file decoded, else why it did not."""

    @property
    def decoded(self) -> np.ndarray:
        """Boolean mask of the files that decoded."""
        return np.array([not error for error in self.errors], bool)


def decode_files(paths: Sequence[str | os.PathLike], size: int) -> DecodedFiles:
    """Decode files to `size`x`size` RGB with `decode_rgb`; a broken file is recorded, never raised."""
    pixels = np.zeros((len(paths), size, size, 3), np.uint8)
    sizes: list[tuple[int, int] | None] = []
    kinds: list[str] = []
    errors: list[str] = []
    for i, path in enumerate(paths):
        try:
            pixels[i], original, kind = decode_rgb(path, (size, size))
            sizes.append(original)
            kinds.append(kind)
            errors.append("")
        except ImageDecodeError as error:
            sizes.append(None)
            kinds.append("")
            errors.append(error.reason)
    return DecodedFiles(pixels, sizes, kinds, errors)


def decoding_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` decoding processes, spawned, not forked: the parent may hold threads (Prefect,
    TensorFlow) that a fork would copy broken. They ignore Ctrl-C, which a terminal sends to the
    whole process group: the parent that owns them stops them, without a traceback from each."""
    return _DecodingPool(workers, mp_context=get_context("spawn"), initializer=_ignore_interrupts)


class _DecodingPool(ProcessPoolExecutor):
    """Workers are spawned inside `submit`, and a Ctrl-C that reached one while it was still importing (before
    its initializer ignores it) printed a traceback. Each submit blocks SIGINT in the submitting thread, so a
    worker spawned then starts with it blocked; the parent gets a Ctrl-C of that moment right after."""

    def submit(self, fn, /, *args, **kwargs):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().submit(fn, *args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DecodeTimeout(Exception):
    """The decoding pool had not returned a chunk by the caller's deadline."""


def decode_files_in_pool(
    paths: Sequence[str | os.PathLike], size: int, pool: Executor | None, chunk_files: int,
    deadline: float | None = None,
) -> Iterator[DecodedFiles]:  # fmt: skip
    """Start `decode_files` over `pool` in chunks of `chunk_files`; returns the decoded chunks in order.

    Every chunk is submitted before this returns, so the caller can work on (classify) the first
    chunks while the pool decodes the rest. Each worker returns one dense pixel array per chunk,
    which pickles far cheaper than an array per image. Without a pool, each chunk is decoded in
    this process when the iterator reaches it. Past `deadline` (`time.monotonic()`), waiting for a
    chunk raises `DecodeTimeout`: a worker stuck on a disk that stopped answering never returns.
    """
    starts = range(0, len(paths), chunk_files)
    if pool is None:
        return (decode_files(paths[i : i + chunk_files], size) for i in starts)
    futures = [pool.submit(decode_files, paths[i : i + chunk_files], size) for i in starts]
    return _released(futures, deadline)


def decode_files_ahead(
    paths: Sequence[str | os.PathLike], size: int, pool: Executor, chunk_files: int, ahead: int
) -> Iterator[DecodedFiles]:
    """`decode_files_in_pool`, but with at most `ahead` chunks submitted and not yet taken: memory holds a few
    chunks, not the whole folder, however fast the pool decodes."""
    starts = iter(range(0, len(paths), chunk_files))
    pending = deque(pool.submit(decode_files, paths[i : i + chunk_files], size) for i in islice(starts, ahead))
    while pending:
        chunk = pending.popleft().result()
        for i in islice(starts, 1):
            pending.append(pool.submit(decode_files, paths[i : i + chunk_files], size))
        yield chunk


def _released(futures: list, deadline: float | None = None) -> Iterator[DecodedFiles]:
    """The futures' results in order, each dropped from the list once taken, so a consumer that writes the
    chunks away does not keep them all alive."""
    for i, future in enumerate(futures):
        futures[i] = None
        try:
            yield future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise DecodeTimeout from None


@dataclass(frozen=True)
class FolderEntry:
    """One file found under an input folder."""

    relative_path: str
    """Path relative to the folder root, with `/` separators."""
    kind: str
    """`image`, `not_image`, or a key of `ENTRY_ERRORS`: `outside_link` (a link leading out of the root:
    never followed), `link_loop`, `dangling_link`, `unreadable_folder` (a sub-folder that cannot be listed)."""


ENTRY_ERRORS = {
    "outside_link": "link points outside the input folder (not followed)",
    "link_loop": "link loop (the link points back at itself)",
    "dangling_link": "link points nowhere (its target is gone)",
    "unreadable_folder": "folder cannot be read (permission denied or I/O error); its files were not classified",
}
"""The error a prediction row gives an entry that is not opened."""


def walk_folder(root: str | os.PathLike, recursive: bool = True) -> Iterator[FolderEntry]:
    """Yield the files under `root` in sorted path order, without following links out of it.

    Folders are visited in sorted order and their entries streamed, so memory does not grow with
    the number of files. Directory links are never descended into; file links are reported as
    `outside_link` when they resolve outside `root` (or dangle).
    """
    root = Path(root).resolve()
    yield from _walk(root, str(root), "", recursive)


def _broken_link_kind(path: str) -> str:
    """Why a link inside the folder leads to no file: a loop, nothing, or something that is not a file."""
    try:
        os.stat(path)
    except OSError as error:
        return "link_loop" if error.errno == errno.ELOOP else "dangling_link"
    return "not_image"


def _walk(root: Path, folder: str, prefix: str, recursive: bool) -> Iterator[FolderEntry]:
    # Plain string paths: pathlib costs more than the rest of a walk's work per file.
    try:
        with os.scandir(folder) as scanner:
            # A folder sorts as "name/" so the walk yields paths in plain string order of the full path.
            entries = sorted(scanner, key=lambda e: e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
    except OSError:
        if not prefix:  # the input folder itself: the caller says so
            raise
        yield FolderEntry(prefix.rstrip("/"), "unreadable_folder")  # the walk goes on
        return
    for entry in entries:
        relative = prefix + entry.name
        if entry.name.startswith("._"):  # macOS's AppleDouble metadata beside a file: never an image
            yield FolderEntry(relative, "not_image")
            continue
        if entry.is_dir(follow_symlinks=False):
            if is_image_name(entry.name):
                yield FolderEntry(relative, "not_image")
            if recursive:
                yield from _walk(root, entry.path, relative + "/", recursive)
            continue
        if not is_image_name(entry.name):
            if entry.is_file() or entry.is_dir():
                yield FolderEntry(relative, "not_image")
            continue
        if entry.is_symlink():
            target = Path(os.path.realpath(entry.path))
            if not target.is_relative_to(root) or not target.is_file():
                yield FolderEntry(
                    relative, _broken_link_kind(entry.path) if target.is_relative_to(root) else "outside_link"
                )
                continue
        if entry.is_dir():  # a link to a folder named like an image
            yield FolderEntry(relative, "not_image")
            continue
        yield FolderEntry(relative, "image")
