"""Model registry under `ARTIFACTS_DIR/models/<name>/`: versions, aliases with history, promotion gate.

Layout: `v<N>/` per version (model, `manifest.json` with every file's sha256, metrics, plots) and
`registry.json` (versions, `latest`/`champion` aliases, append-only alias history).

Writers stage a version in a hidden folder, then, under a file lock, take the next number, rename
the folder into place and replace `registry.json` with `os.replace`. Readers never see a partial
version; concurrent writers from threads or processes all succeed with distinct numbers.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from filelock import FileLock

from model_lib.fileio import owned_folder, read_json, remove_abandoned, sha256_file, write_json
from model_lib.settings import DEFAULT_MODEL_NAME

MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
REGISTRY_FILE = "registry.json"
PROBE_FILE = "probe.npz"
PROBE_TOLERANCE = 1e-4  # max absolute difference in probabilities between the trained and the reloaded model
STAGING_PREFIX = ".staging-"
STALE_STAGING_SECONDS = 6 * 3600  # staging folders older than this are leftovers, even from another host
LOCK_TIMEOUT_SECONDS = 300
_VERSION_DIR = re.compile(r"^v(\d+)$")


class RegistryError(Exception):
    """A reference that does not resolve, or a registry operation that cannot proceed."""


class ChecksumError(RegistryError):
    """A file in a version folder is missing or differs from the sha256 its manifest recorded."""


@dataclass(frozen=True)
class Registration:
    """The outcome of registering a model."""

    name: str
    version: int
    path: str
    champion: bool
    reason: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _crash_point(step: str) -> None:
    """Test hook between the steps of a registration; does nothing in normal runs."""


def check_reloads(version_dir: Path) -> tuple[bool, str]:
    """Gate part (a): the saved model loads with `safe_mode` and reproduces the probe's outputs."""
    import keras

    probe_path = version_dir / PROBE_FILE
    if not probe_path.is_file():
        return False, f"no {PROBE_FILE} with reference outputs to check the reloaded model against"
    try:
        model = keras.saving.load_model(version_dir / MODEL_FILE, safe_mode=True)
    except Exception as error:  # any failure to load is a gate failure, with its message
        return False, f"model does not load with safe_mode: {error}"
    with np.load(probe_path, allow_pickle=False) as probe:
        reloaded = model.predict(probe["inputs"], verbose=0)
        difference = float(np.abs(reloaded - probe["outputs"]).max())
    if difference > PROBE_TOLERANCE:
        return False, f"reloaded model's outputs differ from the trained model's by {difference:.2e}"
    return True, f"reloads with safe_mode and reproduces the trained outputs (max diff {difference:.1e})"


class Registry:
    """One model name's registry.

    Args:
        artifacts_root: `ARTIFACTS_DIR`.
        name: The model name; its folder is `artifacts_root/models/<name>`.
    """

    def __init__(self, artifacts_root: str | os.PathLike, name: str = DEFAULT_MODEL_NAME):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise RegistryError(f"invalid model name {name!r}: letters, digits, '.', '_' and '-' only")
        self.name = name
        self.root = Path(artifacts_root) / "models" / name
        self._lock = registry_lock(self.root)

    # ----- reading ---------------------------------------------------------------------------

    def state(self) -> dict:
        """The parsed `registry.json` (an empty registry if there is none yet)."""
        path = self.root / REGISTRY_FILE
        if not path.is_file():
            return {"name": self.name, "versions": [], "aliases": {"latest": None, "champion": None}, "history": []}
        try:
            state = read_json(path)
        except (ValueError, UnicodeDecodeError) as error:
            state = error
        if not isinstance(state, dict) or not {"versions", "aliases", "history"} <= state.keys():
            problem = state if isinstance(state, Exception) else "missing its versions, aliases or history"
            raise RegistryError(
                f"{path}: corrupt registry ({problem}); the version folders beside it are intact: restore the "
                "file from a backup, or move it away to start a new registry"
            )
        return state

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version}"

    def resolve(self, tag: str = "champion") -> Path:
        """The folder of `champion`, `latest` or `v<N>`.

        Raises:
            RegistryError: Unknown tag or version, or no version under that alias yet.
        """
        state = self.state()
        if tag in state["aliases"]:
            version = state["aliases"][tag]
            if version is None:
                raise RegistryError(f"{self.name}@{tag}: no version is {tag} yet (train one first)")
        elif match := re.fullmatch(r"v?(\d+)", tag):
            version = int(match.group(1))
            if not any(entry["version"] == version for entry in state["versions"]):
                raise RegistryError(f"{self.name}@{tag}: no such version")
        else:
            raise RegistryError(f"{self.name}@{tag}: unknown tag (use champion, latest or v<N>)")
        return self.version_dir(version)

    # ----- writing ---------------------------------------------------------------------------

    def register(
        self,
        files: Mapping[str, str | os.PathLike],
        manifest: dict,
        margin: float = 0.0,
        load_check: Callable[[Path], tuple[bool, str]] = check_reloads,
    ) -> Registration:
        """Add a version and decide whether it becomes champion.

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
        self.root.mkdir(parents=True, exist_ok=True)
        staging = owned_folder(self.root, STAGING_PREFIX)
        try:
            for name, source in files.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            _crash_point("copied")
            loads, load_reason = load_check(staging)
            _crash_point("checked")
            with self._lock:
                state = self.state()
                self._adopt_orphans(state)
                self._remove_stale_staging()
                version = self._next_version(state)
                created_at = _now()
                checksums = {
                    path.relative_to(staging).as_posix(): sha256_file(path)
                    for path in sorted(staging.rglob("*"))
                    if path.is_file()
                }
                write_json(
                    staging / MANIFEST_FILE,
                    {"name": self.name, "version": version, "created_at": created_at, **manifest, "files": checksums},
                )
                _crash_point("manifest_written")
                os.rename(staging, self.version_dir(version))
                _crash_point("renamed")
                promoted, reason = self._gate(state, manifest, margin) if loads else (False, load_reason)
                if loads and promoted:
                    reason = f"{reason}; {load_reason}"
                self._add_version(state, version, created_at, manifest, promoted, reason)
                self._write_state(state)
                _crash_point("state_written")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Registration(self.name, version, str(self.version_dir(version)), promoted, reason)

    def promote(self, tag: str, reason: str) -> int:
        """Make a version champion by hand, after checking its checksums; recorded in the history.

        Raises:
            RegistryError: Unknown model or version, or an empty reason.
            ChecksumError: A file of the version is missing or tampered with.
        """
        self._check_alias_move(reason)
        with self._lock:
            version_dir = self.resolve(tag)
            _require_intact(version_dir)
            version = int(version_dir.name[1:])
            state = self.state()
            self._move_alias(state, "champion", version, reason, action="promote")
            self._write_state(state)
        return version

    def rollback(self, reason: str) -> int:
        """Move champion back to the version that was champion before it; recorded in the history.

        Raises:
            RegistryError: Unknown model, no earlier champion, or an empty reason.
            ChecksumError: A file of the earlier champion is missing or tampered with.
        """
        self._check_alias_move(reason)
        with self._lock:
            state = self.state()
            stack = champion_stack(state["history"])
            if len(stack) < 2:
                raise RegistryError(f"{self.name}: no earlier champion to roll back to")
            _require_intact(self.version_dir(stack[-2]))
            self._move_alias(state, "champion", stack[-2], reason, action="rollback")
            self._write_state(state)
        return stack[-2]

    def record_score(self, version: int, test_fingerprint: str, score: dict) -> None:
        """Store a version's score on another test set (`accuracy`, `loss`, `count`), for the gate.

        Raises:
            RegistryError: Unknown version.
        """
        with self._lock:
            state = self.state()
            entry = _entry(state, version)
            entry.setdefault("scores", {})[test_fingerprint] = {**score, "when": _now()}
            self._write_state(state)

    # ----- internals -------------------------------------------------------------------------

    def _check_alias_move(self, reason: str) -> None:
        """Before taking the lock (which would create the folder): a real model and a reason."""
        if not reason.strip():
            raise RegistryError("--reason must say why the champion moves (it is kept in the history)")
        if not (self.root / REGISTRY_FILE).is_file():
            raise RegistryError(f"{self.name}: no such model (no {self.root / REGISTRY_FILE})")

    def _existing_dir_versions(self) -> list[int]:
        return [int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_DIR.match(p.name)) and p.is_dir()]

    def _next_version(self, state: dict) -> int:
        # Numbers are never reused: not those in registry.json, nor folders a crashed writer left.
        taken = [entry["version"] for entry in state["versions"]] + self._existing_dir_versions()
        return max(taken, default=0) + 1

    def _adopt_orphans(self, state: dict) -> None:
        """A writer killed after its rename left a complete version that registry.json lacks: list it."""
        known = {entry["version"] for entry in state["versions"]}
        for version in sorted(set(self._existing_dir_versions()) - known):
            manifest_path = self.version_dir(version) / MANIFEST_FILE
            if manifest_path.is_file():
                manifest = read_json(manifest_path)
                reason = "recovered after an interrupted registration; not gated (promote it by hand)"
                self._add_version(state, version, manifest.get("created_at", _now()), manifest, False, reason)

    def _remove_stale_staging(self) -> None:
        remove_abandoned(self.root, STAGING_PREFIX)  # a killed writer's, at once
        cutoff = time.time() - STALE_STAGING_SECONDS
        for path in self.root.glob(f"{STAGING_PREFIX}*"):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)

    def _gate(self, state: dict, manifest: dict, margin: float) -> tuple[bool, str]:
        """Gate part (b): above the promotion floor, then better than the champion on the same images.

        The champion's score on this version's test set is its own when the test sets are equal,
        else the one `record_score` stored after re-scoring it on this test set. A champion with
        other classes is never compared by accuracy: the operator decides.
        """
        metrics, dataset = manifest["metrics"], manifest["dataset"]
        accuracy = metrics["test_accuracy"]
        floor = metrics.get("promotion_floor")
        if floor is not None and not accuracy > floor:
            return False, (
                f"test accuracy {accuracy:.4f} is not above the promotion floor {floor:.4f} (the majority-class "
                "rate plus --learned-margin): no better than guessing"
            )
        champion = state["aliases"]["champion"]
        if champion is None:
            first = "first version" if not state["versions"] else "no champion yet"
            return True, first + (f", above the promotion floor {floor:.4f}" if floor is not None else "")
        entry = _entry(state, champion)
        ours, theirs = dataset.get("class_names"), entry.get("class_names")
        if ours is not None and theirs is not None and list(ours) != list(theirs):
            added, removed = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            change = "; ".join(
                part for part in (f"added {', '.join(added)}" if added else "",
                                  f"removed {', '.join(removed)}" if removed else "") if part
            ) or "same classes in another order"  # fmt: skip
            return False, (
                f"classes differ from champion v{champion}'s ({change}): accuracies are not comparable; the "
                "operator decides (cifar-pipeline models promote)"
            )
        fingerprint = dataset.get("test_fingerprint")
        score = champion_scores(entry).get(fingerprint)
        if score is None:
            return False, (
                f"champion v{champion} was not scored on this test set ({fingerprint}): accuracies not compared; "
                "promote by hand if intended"
            )
        where = f"on test set {str(fingerprint)[:12]} ({dataset.get('test_count', '?')} images)"
        bar = score + margin
        if accuracy >= bar:
            return True, f"test accuracy {accuracy:.4f} >= champion v{champion}'s {score:.4f} + {margin} {where}"
        return False, f"test accuracy {accuracy:.4f} < champion v{champion}'s {score:.4f} + {margin} {where}"

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

    def _write_state(self, state: dict) -> None:
        write_json(self.root / REGISTRY_FILE, state)


def _entry(state: dict, version: int) -> dict:
    for entry in state["versions"]:
        if entry["version"] == version:
            return entry
    raise RegistryError(f"v{version}: no such version")


def champion_scores(entry: dict) -> dict[str, float]:
    """A version's test accuracy by test-set fingerprint: its own test set's and any recorded since."""
    scores = {entry.get("test_fingerprint"): entry.get("test_accuracy")}
    scores |= {fingerprint: score["accuracy"] for fingerprint, score in entry.get("scores", {}).items()}
    return scores


def registry_lock(model_root: Path) -> FileLock:
    """The lock every writer of one model name's registry.json or manifests holds."""
    return FileLock(str(model_root / ".registry.lock"), timeout=LOCK_TIMEOUT_SECONDS)


def attach_to_version(
    version_dir: Path,
    files: Mapping[str, str | os.PathLike],
    key: str,
    entries: list[dict],
    merge_on: str | None = None,
) -> dict:
    """Add files to a registered version and record them in its manifest under `key`.

    Files are copied in first (each renamed into place), then the manifest is replaced with one
    that lists them with their sha256 (also added to each entry), under the registry's lock so
    manifest rewrites never interleave. Returns the new files' checksums by name.

    Args:
        merge_on: Keep the manifest's entries under `key` whose value of this field no new entry has
            (e.g. "format": exports of other formats stay listed); default: `entries` replace them all.
    """
    with registry_lock(version_dir.parent):
        checksums = {}
        for name, source in files.items():
            partial = version_dir / f".{name}.partial"
            shutil.copyfile(source, partial)
            os.replace(partial, version_dir / name)
            checksums[name] = sha256_file(version_dir / name)
        manifest = read_json(version_dir / MANIFEST_FILE)
        manifest["files"].update(checksums)
        if merge_on is not None:  # replaced entries keep their place; new ones go last
            new = {entry[merge_on]: entry for entry in entries}
            entries = [new.pop(entry[merge_on], entry) for entry in manifest.get(key, [])] + list(new.values())
        manifest[key] = [{**entry, "sha256": manifest["files"].get(entry.get("file"))} for entry in entries]
        write_json(version_dir / MANIFEST_FILE, manifest)
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
    candidate = Path(ref).expanduser()
    if (candidate / MANIFEST_FILE).is_file():
        return candidate.resolve()
    name, _, tag = ref.partition("@")
    if "/" in name or os.sep in name:
        raise RegistryError(f"{ref}: not a version folder (no {MANIFEST_FILE})")
    return Registry(artifacts_root, name or DEFAULT_MODEL_NAME).resolve(tag or "champion")


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


def _require_intact(version_dir: Path, replacing: tuple[str, ...] = ()) -> None:
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
    _require_intact(version_dir, replacing)
    import keras

    return keras.saving.load_model(version_dir / MODEL_FILE, safe_mode=True)
