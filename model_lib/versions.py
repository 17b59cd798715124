"""A version folder's integrity, and this machine's verified copies of versions kept in an object store.

A version's manifest lists every file with its sha256: nothing loads, serves or promotes a version whose
files are missing or differ. A version in an object store is read through a local copy under the cache
(`work_dir()/registries/`), downloaded once per manifest and checked against every sha256 before use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from model_lib.fileio import owned_folder, parse_json, read_json, remove_abandoned, sha256_file
from model_lib.runs import MODEL_FILE
from model_lib.stores import Store, content_tag

MANIFEST_FILE = "manifest.json"
MIRRORS = "registries"  # under work_dir(): local copies of versions kept in object stores
STAGING_PREFIX = ".staging-"


class RegistryError(Exception):
    """A reference that does not resolve, or a registry operation that cannot proceed."""


class ChecksumError(RegistryError):
    """A file in a version folder is missing or differs from the sha256 its manifest recorded."""


class VerifiedCopies:
    """This machine's copies of one registry's versions kept in an object store, one folder per manifest."""

    def __init__(self, store: Store, root: Path, name: str):
        self.store, self.root, self.name = store, root, name

    def folder(self, version: int, manifest: bytes) -> Path:
        return self.root / f"v{version}-{content_tag(manifest)[:16]}"

    def get(self, version: int, fresh: bool = False) -> Path:
        """A local copy of a remote version, one per manifest, every file checked against its sha256.

        Args:
            fresh: Download again even if a copy exists (promotion checks the store's files themselves).

        Raises:
            ChecksumError: A file is missing from the store or differs from its manifest's sha256.
        """
        folder, problems = self.fetch(version, fresh)
        if problems:
            raise ChecksumError(f"{self.name} v{version} refused: " + "; ".join(problems))
        return folder

    def fetch(self, version: int, fresh: bool) -> tuple[Path, list[str]]:
        """The verified copy's folder and the problems found (named by their place in the store) when the files
        were downloaded now. A copy whose store files no longer match is dropped, so no later read serves it."""
        data = self.store.read(f"v{version}/{MANIFEST_FILE}")
        listed = parse_json(data, self.store.where(f"v{version}/{MANIFEST_FILE}"))["files"]
        folder = self.folder(version, data)
        if (folder / MANIFEST_FILE).is_file() and not fresh:
            return folder, []
        self.root.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.root, STAGING_PREFIX)
        staging = owned_folder(self.root, STAGING_PREFIX)
        try:
            for name in listed:
                try:
                    self.store.download(f"v{version}/{name}", staging / name)
                except FileNotFoundError:
                    pass  # named by the check below
            (staging / MANIFEST_FILE).write_bytes(data)
            problems = [
                problem.replace(str(staging), self.store.where(f"v{version}")) for problem in verify_version(staging)
            ]
            shutil.rmtree(folder, ignore_errors=True)
            if not problems:
                os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder, problems


def verify_version(version_dir: Path, names: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    """Problems with a version folder's files against its manifest; empty when all checksums match.

    Args:
        names: Check only these files (one export about to be loaded); default every file listed.
        skip: Listed files not to check (exports about to be written again).
    """
    manifest_path = version_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing"]
    listed = read_json(manifest_path)["files"]
    problems = [
        f"{version_dir / name}: not listed in the version's manifest" for name in names or () if name not in listed
    ]
    for name, expected in listed.items():
        if (names is not None and name not in names) or name in skip:
            continue
        path = version_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: checksum differs from the manifest's (tampered or corrupted)")
    return problems


def require_intact(version_dir: Path, replacing: tuple[str, ...] = ()) -> None:
    problems = verify_version(version_dir, skip=replacing)
    if problems:
        raise ChecksumError(f"{version_dir.name} refused: " + "; ".join(problems))


def load_verified_model(version_dir: Path, replacing: tuple[str, ...] = ()):
    """Load a version's Keras model after checking every file's sha256; `safe_mode` stays on.

    Args:
        replacing: Files about to be written again (a tampered export), exempt from the check.

    Raises:
        ChecksumError: A file is missing or its checksum differs; the message names it.
    """
    require_intact(version_dir, replacing)
    import keras

    return keras.saving.load_model(version_dir / MODEL_FILE, safe_mode=True)
