"""Crash-safe file writes: write beside the target, then `os.replace` it into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
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


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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
    """Create `parent/<prefix><id>-<process tag>`, a work folder `remove_abandoned` can clean up after a kill."""
    folder = Path(parent) / f"{prefix}{uuid.uuid4().hex[:12]}-{process_tag()}"
    folder.mkdir(parents=True)
    return folder


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the `owned_folder`s under `parent` whose process has ended (a killed run's leftovers)."""
    removed = []
    for folder in Path(parent).glob(f"{prefix}*"):
        if folder.is_dir() and process_gone(folder.name[len(prefix) :].partition("-")[2]):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
