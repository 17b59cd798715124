"""Model registry under `ARTIFACTS_DIR/models/<name>/`: versions, aliases with history; the gate that decides
a promotion is model_lib/gate.py.

Layout: `v<N>/` per version (model, `manifest.json` with every file's sha256, metrics, plots),
`registry.json` (versions, `latest`/`champion` aliases, append-only alias history) and `.claims/`
(one small object per version number ever taken). `ARTIFACTS_DIR` may be a local folder or an
object store (`s3://...`, see `model_lib.stores`); the same steps hold on both, and across machines:

1. A writer stages and checks the version locally, then claims the next free number by creating
   `.claims/v<N>` only if absent (an S3 conditional write, or an exclusive local create): two
   writers never get one number, and numbers are never reused.
2. It writes the version's files, `manifest.json` last (locally: renames the staged folder into place).
3. It adds the version to `registry.json` by compare-and-swap: read it with its tag, decide the
   gate against the champion it read, write only if nobody wrote in between; else read again and
   decide again. So the gate always compares with the one shared champion, and no update is lost.

Readers only see versions listed in `registry.json`, so a writer killed at any step leaves
nothing half-visible. The next registration cleans up after it: a claimed version whose writer is
gone (its process ended on this host, or its claim is older than `STALE_CLAIM_SECONDS`) is listed
if its manifest landed ("recovered", never gated) and its files removed if not.

Versions in an object store are read through a local copy under the cache, downloaded once per manifest
and checked against every sha256 before it is used (model_lib/versions.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote

from model_lib.config import ConfigError, option
from model_lib.fileio import (
    owned_folder,
    process_gone,
    process_tag,
    read_json,
    remove_abandoned,
    seconds_since_written,
    sha256_file,
    write_json,
)
from model_lib.gate import check_reloads, promotion_decision
from model_lib.runs import MODEL_FILE
from model_lib.settings import DEFAULT_MODEL_NAME, REGISTRY_FOLDER, is_url, work_dir
from model_lib.stores import LocalStore, Store, open_store
from model_lib.versions import (
    MANIFEST_FILE,
    MIRRORS,
    STAGING_PREFIX,
    RegistryError,
    VerifiedCopies,
    require_intact,
    verify_version,
)

REGISTRY_FILE = "registry.json"
CLAIMS = ".claims"  # `.claims/v<N>`: who took version number N, and when
STALE_STAGING_SECONDS = 6 * 3600  # staging folders older than this are leftovers, even from another host
STALE_CLAIM_SECONDS = 3600  # a claim not listed after this long is a dead writer's, even from another host
UPDATE_ATTEMPTS = 200  # compare-and-swap rounds before giving up (each loses only to a write that succeeded)
_VERSION_DIR = re.compile(r"^v(\d+)$")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # a named alias (`prune --alias edge`)
RESERVED_ALIASES = ("champion", "latest")
_in_flight: set[str] = set()  # this process's claims whose registration is still running
T = TypeVar("T")


@dataclass(frozen=True)
class Registration:
    """The outcome of registering a model."""

    name: str
    version: int
    path: str  # a local folder with its files: the registry's own, or this machine's verified copy
    champion: bool
    reason: str
    location: str  # where the registry keeps it: the same folder, or its s3:// URL


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _crash_point(step: str) -> None:
    """Test hook between the steps of a registration; does nothing in normal runs."""


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8")


def compare_and_swap(store: Store, key: str, change: Callable[[bytes | None], tuple[bytes, T]], what: str) -> T:
    """Read `key`, compute its new content with `change`, write it only if nobody wrote in between; repeat.

    `change` gets the current bytes (None when absent) and returns the new bytes and a result; it
    runs again after every lost race, so it must decide from what it is given.
    """
    for attempt in range(UPDATE_ATTEMPTS):
        current, tag = store.read_tagged(key)
        data, result = change(current)
        if store.write_if(key, data, tag):
            return result
        time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))  # back off, out of step with the others
    raise RegistryError(f"{store.where(key)}: {UPDATE_ATTEMPTS} writers in a row changed it first; {what} gave up")


class Registry:
    """One model name's registry.

    Args:
        artifacts_root: `ARTIFACTS_DIR`: a local folder or an object-store URL.
        name: The model name; its folder is `artifacts_root/models/<name>`.
    """

    def __init__(self, artifacts_root: str | os.PathLike, name: str = DEFAULT_MODEL_NAME):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise RegistryError(f"invalid model name {name!r}: letters, digits, '.', '_' and '-' only")
        self.name = name
        location = f"{str(artifacts_root).rstrip('/')}/{REGISTRY_FOLDER}/{name}" if is_url(artifacts_root) else None
        self.store = open_store(location or Path(artifacts_root) / REGISTRY_FOLDER / name)
        self.location = self.store.url
        # The version folders this process reads: the registry's own, or local copies of a remote one.
        local = isinstance(self.store, LocalStore)
        self.root = self.store.root if local else work_dir() / MIRRORS / quote(self.location, safe="")
        self.copies = VerifiedCopies(self.store, self.root, name)

    @property
    def remote(self) -> bool:
        return not isinstance(self.store, LocalStore)

    # ----- reading ---------------------------------------------------------------------------

    def state(self) -> dict:
        """The parsed `registry.json` (an empty registry if there is none yet)."""
        data, _ = self.store.read_tagged(REGISTRY_FILE)
        return self._parse_state(data)

    def _parse_state(self, data: bytes | None) -> dict:
        if data is None:
            return {"name": self.name, "versions": [], "aliases": {"latest": None, "champion": None}, "history": []}
        try:
            state = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            state = error
        problem = state if isinstance(state, Exception) else _state_problem(state)
        if problem:
            raise RegistryError(
                f"{self.store.where(REGISTRY_FILE)}: corrupt registry ({problem}); the version folders beside it "
                "are intact: restore the file from a backup, or move it away to start a new registry"
            )
        return state

    def version_dir(self, version: int) -> Path:
        """A local folder with the version's files: its own folder, or a verified copy of a remote one.

        Raises:
            RegistryError: The version's manifest is missing (a folder emptied or damaged by hand).
        """
        if self.remote:
            try:
                return self.copies.get(version)
            except FileNotFoundError:
                raise RegistryError(f"{self.store.where(f'v{version}/{MANIFEST_FILE}')}: missing") from None
        folder = self.root / f"v{version}"
        if not (folder / MANIFEST_FILE).is_file():
            raise RegistryError(f"{folder / MANIFEST_FILE}: missing; the version folder is incomplete or damaged")
        return folder

    def resolve(self, tag: str = "champion") -> Path:
        """The folder of `champion`, `latest` or `v<N>`.

        Raises:
            RegistryError: Unknown tag or version, or no version under that alias yet.
        """
        return self.version_dir(self.resolve_version(tag))

    def resolve_version(self, tag: str = "champion") -> int:
        """The version number `champion`, `latest` or `v<N>` names (see `resolve`)."""
        state = self.state()
        if tag in state["aliases"]:
            version = state["aliases"][tag]
            if version is None:
                others = [] if state["versions"] else self.other_names()
                hint = f"registered here: {', '.join(others)} (name one, e.g. {others[0]}@{tag})" if others else (
                    "train one first")  # fmt: skip
                raise RegistryError(f"{self.name}@{tag}: no version is {tag} yet; {hint}")
        elif match := re.fullmatch(r"v?(\d+)", tag):
            version = int(match.group(1))
            if not any(entry["version"] == version for entry in state["versions"]):
                raise RegistryError(f"{self.name}@{tag}: no such version")
        else:
            raise RegistryError(f"{self.name}@{tag}: unknown tag (use champion, latest or v<N>)")
        return version

    def other_names(self) -> list[str]:
        """The other model names with a registry beside this one (a user who trained `--data ~/digits` and then
        asks for the default `cifar10` should be told `digits` is there)."""
        parent = open_store(self.location.rsplit("/", 1)[0] if self.remote else self.store.root.parent)
        return [name for name in parent.list() if name != self.name and parent.exists(f"{name}/{REGISTRY_FILE}")]

    def check(self, version: int) -> tuple[str, list[str]]:
        """Where the version's files are, and the problems with them as they are there now (empty when every
        checksum matches). A remote version's files are downloaded again and hashed: a verified copy on this
        machine says nothing of the store, where someone may have replaced a file since."""
        if not self.remote:
            folder = self.version_dir(version)
            return str(folder), verify_version(folder)
        return self.store.where(f"v{version}"), self.copies.fetch(version, fresh=True)[1]

    # ----- writing ---------------------------------------------------------------------------

    def register(
        self,
        files: Mapping[str, str | os.PathLike],
        manifest: dict,
        margin: float = 0.0,
        load_check: Callable[[Path], tuple[bool, str]] = check_reloads,
    ) -> Registration:
        """Add a version and decide whether it becomes champion (the steps in the module docstring).

        Args:
            files: Name in the version folder -> source file. Must include `model.keras`; include
                `probe.npz` (inputs and the trained model's outputs) for the load-back check.
            manifest: Manifest fields from the caller (config, metrics, dataset, code, ...). The
                registry adds `version`, `created_at` and `files`.
            margin: Test accuracy a challenger must add to the champion's to replace it.
            load_check: Gate part (a), run on the staged folder before any number is taken.

        Returns:
            The version number, its folder, and the gate's decision with its reason.
        """
        if MODEL_FILE not in files:
            raise RegistryError(f"a registration needs a {MODEL_FILE}")
        self.state()  # a corrupt registry.json stops us before any copying
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()
        staging = owned_folder(self.root, STAGING_PREFIX)
        claim = uuid.uuid4().hex
        _in_flight.add(claim)
        try:
            for name, source in files.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            _crash_point("copied")
            loads, load_reason = load_check(staging)
            _crash_point("checked")
            checksums = {
                path.relative_to(staging).as_posix(): sha256_file(path)
                for path in sorted(staging.rglob("*"))
                if path.is_file()
            }
            version = self._claim_number(claim)
            created_at = _now()
            write_json(
                staging / MANIFEST_FILE,
                {"name": self.name, "version": version, "created_at": created_at, **manifest, "files": checksums},
            )
            _crash_point("manifest_written")
            self._publish(staging, version, checksums)
            _crash_point("renamed")

            def add(state: dict) -> tuple[bool, str]:
                promoted, reason = self._gate(state, manifest, margin) if loads else (False, load_reason)
                if loads and promoted:
                    reason = f"{reason}; {load_reason}"
                state["versions"] = [entry for entry in state["versions"] if entry["version"] != version]
                self._add_version(state, version, created_at, manifest, promoted, reason)
                return promoted, reason

            promoted, reason = self._update_state(add, "registration")
            _crash_point("state_written")
        finally:
            _in_flight.discard(claim)
            shutil.rmtree(staging, ignore_errors=True)
        return Registration(
            self.name, version, str(self.version_dir(version)), promoted, reason, self.store.where(f"v{version}")
        )

    def promote(self, tag: str, reason: str) -> int:
        """Make a version champion by hand, after checking its checksums; recorded in the history.

        Raises:
            RegistryError: Unknown model or version, or an empty reason.
            ChecksumError: A file of the version is missing or tampered with.
        """
        self._check_alias_move(reason)
        version = self.resolve_version(tag)
        self._require_intact(version)

        def move(state: dict) -> None:
            _entry(state, version)
            self._move_alias(state, "champion", version, reason, action="promote")

        self._update_state(move, "promotion")
        return version

    def set_alias(self, alias: str, tag: str, reason: str) -> int:
        """Point a named alias (`edge`, ...) at a version after checking its checksums; recorded in the history.
        `champion` moves only by the gate, `promote` and `rollback`, `latest` only by registering.

        Raises:
            ConfigError: The alias is not a name of its own (`check_alias`).
            RegistryError: Unknown model or version, or an empty reason.
            ChecksumError: A file of the version is missing or tampered with.
        """
        check_alias(alias)
        self._check_alias_move(reason)
        version = self.resolve_version(tag)
        self._require_intact(version)

        def move(state: dict) -> None:
            _entry(state, version)
            self._move_alias(state, alias, version, reason, action="alias")

        self._update_state(move, "alias")
        return version

    def rollback(self, reason: str) -> int:
        """Move champion back to the version that was champion before it; recorded in the history.

        Raises:
            RegistryError: Unknown model, no earlier champion, or an empty reason.
            ChecksumError: A file of the earlier champion is missing or tampered with.
        """
        self._check_alias_move(reason)
        checked: set[int] = set()

        def move(state: dict) -> int:
            stack = champion_stack(state["history"])
            if len(stack) < 2:
                raise RegistryError(f"{self.name}: no earlier champion to roll back to")
            if stack[-2] not in checked:  # once per target, even when a race makes us decide again
                self._require_intact(stack[-2])
                checked.add(stack[-2])
            self._move_alias(state, "champion", stack[-2], reason, action="rollback")
            return stack[-2]

        return self._update_state(move, "rollback")

    def record_score(self, version: int, test_fingerprint: str, score: dict) -> None:
        """Store a version's score on another test set (`accuracy`, `loss`, `count`), for the gate.

        Raises:
            RegistryError: Unknown version.
        """

        def add(state: dict) -> None:
            _entry(state, version).setdefault("scores", {})[test_fingerprint] = {**score, "when": _now()}

        self._update_state(add, "recording a score")

    # ----- internals -------------------------------------------------------------------------

    def _update_state(self, change: Callable[[dict], T], what: str) -> T:
        """Apply `change` to registry.json by compare-and-swap, after listing or clearing dead writers' versions."""

        def apply(current: bytes | None) -> tuple[bytes, T]:
            state = self._parse_state(current)
            self._settle_orphans(state)
            result = change(state)
            return _json_bytes(state), result

        return compare_and_swap(self.store, REGISTRY_FILE, apply, what)

    def _require_intact(self, version: int) -> None:
        if self.remote:
            self.copies.get(version, fresh=True)  # checks the store's files as they are now
        else:
            require_intact(self.version_dir(version))

    def _check_alias_move(self, reason: str) -> None:
        """Before any write: a real model and a reason."""
        if not reason.strip():
            raise RegistryError("--reason must say why the champion moves (it is kept in the history)")
        if not self.store.exists(REGISTRY_FILE):
            raise RegistryError(f"{self.name}: no such model (no {self.store.where(REGISTRY_FILE)})")

    def _taken_numbers(self) -> set[int]:
        """Every version number claimed or with a folder (folders of registries older than claims too)."""
        names = self.store.list(CLAIMS) + self.store.list()
        return {int(match.group(1)) for name in names if (match := _VERSION_DIR.match(name))}

    def _claim_number(self, claim: str) -> int:
        """The next free version number, taken by creating its claim only if absent."""
        record = _json_bytes({"owner": process_tag(), "claim": claim, "claimed_at": time.time()})
        version = max(self._taken_numbers() | {entry["version"] for entry in self.state()["versions"]}, default=0)
        while True:
            version += 1
            if self.store.write_if(f"{CLAIMS}/v{version}", record, None):
                return version

    def _publish(self, staging: Path, version: int, checksums: dict[str, str]) -> None:
        """Make the staged files the version's folder: a rename locally; uploads, manifest last, remotely."""
        if isinstance(self.store, LocalStore):
            os.rename(staging, self.store.root / f"v{version}")
            return
        for name in checksums:
            self.store.upload(staging / name, f"v{version}/{name}")
            _crash_point("uploading")
        self.store.upload(staging / MANIFEST_FILE, f"v{version}/{MANIFEST_FILE}")
        os.replace(staging, self.copies.folder(version, (staging / MANIFEST_FILE).read_bytes()))  # no download back

    def _settle_orphans(self, state: dict) -> None:
        """List the versions of writers that died after their manifest landed; clear those that died before."""
        known = {entry["version"] for entry in state["versions"]}
        for version in sorted(self._taken_numbers() - known):
            claim_data, claim_tag = self.store.read_tagged(f"{CLAIMS}/v{version}")
            claim = json.loads(claim_data) if claim_data else {}
            if claim.get("abandoned") or self._writer_alive(claim):
                continue
            manifest_data, _ = self.store.read_tagged(f"v{version}/{MANIFEST_FILE}")
            if manifest_data is not None:
                manifest = json.loads(manifest_data)
                reason = "recovered after an interrupted registration; not gated (promote it by hand)"
                self._add_version(state, version, manifest.get("created_at", _now()), manifest, False, reason)
            else:  # the number stays taken; the partial files go
                if claim_data is not None:
                    self.store.write_if(f"{CLAIMS}/v{version}", _json_bytes({**claim, "abandoned": _now()}), claim_tag)
                self.store.remove(f"v{version}")

    def _writer_alive(self, claim: dict) -> bool:
        """Whether the registration that made a claim may still be running."""
        if not claim:  # a version folder without a claim: a registry older than claims, or a test's leftover
            return False
        if claim["claim"] in _in_flight:
            return True
        owner = claim.get("owner", "")
        if owner == process_tag() or process_gone(owner):  # ours and no longer running, or a dead process here
            return False
        return time.time() - claim.get("claimed_at", 0) < STALE_CLAIM_SECONDS

    def _remove_stale_staging(self) -> None:
        remove_abandoned(self.root, STAGING_PREFIX)  # a killed writer's, at once
        for path in self.root.glob(f"{STAGING_PREFIX}*"):
            age = seconds_since_written(path)  # None: its writer renamed it into place since the listing
            if age is not None and age > STALE_STAGING_SECONDS:
                shutil.rmtree(path, ignore_errors=True)

    def _gate(self, state: dict, manifest: dict, margin: float) -> tuple[bool, str]:
        champion = state["aliases"]["champion"]
        entry = _entry(state, champion) if champion is not None else None
        return promotion_decision(manifest, margin, entry, first=not state["versions"])

    def _add_version(self, state: dict, version: int, created_at: str, manifest: dict, promoted: bool, reason: str):
        state["versions"].append(
            {
                "version": version,
                "created_at": created_at,
                "architecture": manifest.get("architecture"),
                "test_accuracy": manifest.get("metrics", {}).get("test_accuracy"),
                "test_fingerprint": manifest.get("dataset", {}).get("test_fingerprint"),
                "class_names": manifest.get("dataset", {}).get("class_names"),
                "gate": reason,
            }
            | ({"pruned_from": pruned["from"]} if (pruned := manifest.get("config", {}).get("pruned")) else {})
        )
        state["versions"].sort(key=lambda entry: entry["version"])
        if (state["aliases"]["latest"] or 0) < version:
            self._move_alias(state, "latest", version, "registered", action="register")
        if promoted:
            self._move_alias(state, "champion", version, reason, action="register")
        else:
            state["history"].append(
                {
                    "alias": "champion",
                    "from": state["aliases"]["champion"],
                    "to": state["aliases"]["champion"],
                    "when": _now(),
                    "why": f"v{version} stays challenger: {reason}",
                    "action": "gate_refused",
                }
            )

    @staticmethod
    def _move_alias(state: dict, alias: str, version: int, why: str, action: str) -> None:
        previous = state["aliases"].get(alias)
        state["aliases"][alias] = version
        state["history"].append(
            {"alias": alias, "from": previous, "to": version, "when": _now(), "why": why, "action": action}
        )


def check_alias(alias: str) -> None:
    """Raises ConfigError unless `alias` can name a version beside champion and latest: lower-case letters, digits,
    `-` and `_`, starting with a letter, and not `v<N>` (a version's own name)."""
    if alias in RESERVED_ALIASES or not ALIAS_NAME.fullmatch(alias) or _VERSION_DIR.match(alias):
        raise ConfigError(
            f"{option('alias')} {alias!r}: an alias is a lower-case name such as edge (letters, digits, - and _), "
            f"not {' or '.join(RESERVED_ALIASES)}, which the gate moves, nor v<N>"
        )


def _state_problem(state) -> str | None:
    """What is wrong with a parsed registry.json's shape, or None: checked on every read, so a file with the
    right keys and wrong values is named as corrupt, not met later as a TypeError or a path like `vv9`."""
    if not isinstance(state, dict) or not {"versions", "aliases", "history"} <= state.keys():
        return "missing its versions, aliases or history"
    versions, aliases, history = state["versions"], state["aliases"], state["history"]
    if not isinstance(versions, list) or not all(isinstance(entry, dict) for entry in versions):
        return "versions is not a list of entries"
    numbers = [entry.get("version") for entry in versions]
    if not all(type(number) is int and number > 0 for number in numbers) or len(set(numbers)) != len(numbers):
        return "a version number is missing, not a positive whole number, or listed twice"
    if not isinstance(aliases, dict) or not {"latest", "champion"} <= aliases.keys():
        return "aliases has no latest or champion"
    for alias, version in aliases.items():
        if version is not None and version not in numbers:
            return f"alias {alias} points at v{version}, which is not listed"
    if not isinstance(history, list) or not all(isinstance(move, dict) and "alias" in move for move in history):
        return "history is not a list of alias moves"
    return None


def _entry(state: dict, version: int) -> dict:
    for entry in state["versions"]:
        if entry["version"] == version:
            return entry
    raise RegistryError(f"v{version}: no such version")


def attach_to_version(
    version_dir: Path,
    files: Mapping[str, str | os.PathLike],
    key: str,
    entries: list[dict],
    merge_on: str | None = None,
) -> dict:
    """Add files to a registered version and record them in its manifest under `key`.

    Files are written first (each atomically), then the manifest is replaced by compare-and-swap
    with one that lists them with their sha256 (also added to each entry), so concurrent additions
    never lose each other's entries. `version_dir` is the version's own folder or, for a registry in
    an object store, the local copy `Registry.version_dir` gave: the files then go to the store.
    Returns the new files' checksums by name.

    Args:
        merge_on: Keep the manifest's entries under `key` whose value of this field no new entry has
            (e.g. "format": exports of other formats stay listed); default: `entries` replace them all.
    """
    version_dir = Path(version_dir)
    mirrors, location = version_dir.parent.parent, unquote(version_dir.parent.name)
    if mirrors.name == MIRRORS and is_url(location):  # a local copy: write to the store it came from
        version = read_json(version_dir / MANIFEST_FILE)["version"]
        return _attach(open_store(location), f"v{version}", files, key, entries, merge_on)
    return _attach(LocalStore(version_dir.parent), version_dir.name, files, key, entries, merge_on)


def _attach(store: Store, folder: str, files: Mapping[str, str | os.PathLike], key: str, entries: list[dict],
            merge_on: str | None) -> dict:  # fmt: skip
    checksums = {}
    for name, source in files.items():
        store.upload(Path(source), f"{folder}/{name}")
        checksums[name] = sha256_file(source)

    def add(current: bytes | None) -> tuple[bytes, None]:
        if current is None:
            raise RegistryError(f"{store.where(folder)}: not a registered version (no {MANIFEST_FILE})")
        manifest = json.loads(current)
        manifest["files"].update(checksums)
        listed = entries
        if merge_on is not None:  # replaced entries keep their place; new ones go last
            new = {entry[merge_on]: entry for entry in entries}
            listed = [new.pop(entry[merge_on], entry) for entry in manifest.get(key, [])] + list(new.values())
        manifest[key] = [{**entry, "sha256": manifest["files"].get(entry.get("file"))} for entry in listed]
        return _json_bytes(manifest), None

    compare_and_swap(store, f"{folder}/{MANIFEST_FILE}", add, f"adding {key} to the manifest")
    return checksums


def champion_stack(history: list[dict]) -> list[int]:
    """Champions in order of their reign, with rolled-back ones popped: the last is the current one."""
    stack: list[int] = []
    for move in history:
        if move["alias"] != "champion" or move["action"] == "gate_refused":
            continue
        if move["action"] == "rollback":
            while stack and stack[-1] != move["to"]:
                stack.pop()
        elif not stack or stack[-1] != move["to"]:
            stack.append(move["to"])
    return stack


def parse_reference(ref: str, artifacts_root: str | os.PathLike) -> Path:
    """Resolve `name`, `name@champion`, `name@latest`, `name@v3` or a version folder path to a folder.

    Raises:
        RegistryError: The reference does not resolve.
    """
    if folder := _folder_reference(ref):
        return folder
    name, tag = _registry_reference(ref)
    return Registry(artifacts_root, name).resolve(tag)


def check_reference(ref: str, artifacts_root: str | os.PathLike) -> tuple[str, list[str]]:
    """Where the version `ref` names keeps its files, and their problems as they are there now (`Registry.check`)."""
    if folder := _folder_reference(ref):
        return str(folder), verify_version(folder)
    name, tag = _registry_reference(ref)
    registry = Registry(artifacts_root, name)
    return registry.check(registry.resolve_version(tag))


def _folder_reference(ref: str) -> Path | None:
    candidate = Path(ref).expanduser()
    return candidate.resolve() if ref and (candidate / MANIFEST_FILE).is_file() else None


def _registry_reference(ref: str) -> tuple[str, str]:
    name, at, tag = ref.partition("@")
    if not name or (at and not tag):
        raise ConfigError(
            f"model reference {ref!r} is incomplete: use name, name@champion, name@latest, name@v3 or a version folder"
        )
    if "/" in name or os.sep in name:
        raise RegistryError(f"{ref}: not a version folder (no {MANIFEST_FILE})")
    return name, tag or "champion"
