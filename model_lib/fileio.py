"""Crash-safe local file I/O: writes land whole by `os.replace`, with the umask's permissions; JSON read with
one clear line when it does not parse; checksums; folders owned by a live process. Shared outputs (a folder
or an object store) go through a `Store` (model_lib/stores.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it atomically replaces `path`.

    A crash or exception inside the block leaves `path` untouched and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_atomic(model, path: Path) -> None:
    """Save a Keras model (`model.save`) so that a crash never leaves a partial `.keras` file at `path`."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask, read from /proc where it can be; elsewhere set and straight back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # not thread-safe, hence /proc first
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


class CorruptFile(ValueError):
    """A file the project wrote does not parse (truncated, or edited by hand); the message names it."""


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file.

    Raises:
        CorruptFile: It is not valid JSON (one line naming the file, not a JSONDecodeError's traceback).
    """
    with open(path, "rb") as handle:
        return parse_json(handle.read(), str(path))


def parse_json(data: bytes, where: str) -> Any:
    """JSON bytes read from `where` (a path or a store URL, for the message).

    Raises:
        CorruptFile: They are not valid JSON.
    """
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFile(f"{where}: not valid JSON ({error}): truncated or edited; restore it from a copy") from None


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def process_tag() -> str:
    """`<pid>@<host>`: names the process that owns a folder, so leftovers of a killed one can be told apart."""
    return f"{os.getpid()}@{socket.gethostname()}"


def process_gone(tag: str) -> bool:
    """Whether the process a `process_tag` names has ended; False when that cannot be told (another host)."""
    pid, _, host = tag.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def owned_folder(parent: Path, prefix: str) -> Path:
    """Create `parent/<prefix><id>-<process tag>`, a work folder `remove_abandoned` can clean up after a kill.

    The id starts with the creation time in nanoseconds, so such folders sort in the order they were made.
    """
    folder = Path(parent) / f"{prefix}{time.time_ns():020d}{uuid.uuid4().hex[:8]}-{process_tag()}"
    folder.mkdir(parents=True)
    return folder


class NotWritable(OSError):
    """A folder this process cannot write in; the message names it, what it is for and the cause."""


def check_writable(folder: Path, role: str) -> None:
    """Refuse a local `folder` this process cannot write in, before work whose result would end there.

    Creates it, as its writer would, and a probe file in it: that answers for read-only mounts,
    permissions and ACLs alike, which mode bits alone do not.

    Raises:
        NotWritable: Naming the folder, its `role` (e.g. "the model registry") and the cause.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise NotWritable(f"{folder}: {role} is not writable here ({error.strerror or error}); "
                          "nothing was started") from None  # fmt: skip


def seconds_since_written(path: Path) -> float | None:
    """Seconds since `path` was last modified; None once it is gone (another process may remove or rename it
    between a listing and this look)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the `owned_folder`s under `parent` whose process has ended (a killed run's leftovers)."""
    removed = []
    for folder in Path(parent).glob(f"{prefix}*"):
        if folder.is_dir() and process_gone(folder.name[len(prefix) :].partition("-")[2]):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
