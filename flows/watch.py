"""`cifar-pipeline watch`: new files in watched folders become Prefect events, which the deployment
triggers in `prefect.yaml` turn into runs (a retrain for training data, batch-predict for an inbox).

A burst of files (a copy of a thousand images) gives one event: changes are collected until the
folder has been quiet for `quiet_seconds` (watchfiles' timeout), then sent together.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from model_lib.config import QUIET_SECONDS_BOUNDS, ConfigError, check_number
from model_lib.images import is_image_name

TRAINING_EVENT = "cifar-pipeline.training-data.changed"
INBOX_EVENT = "cifar-pipeline.inbox.changed"
EVENTS = {"data": TRAINING_EVENT, "inbox": INBOX_EVENT}
FILES_PER_EVENT = 1000  # an inbox event lists its files; far below Prefect's 1.5 MB event limit
EXAMPLES = 10  # file names a training-data event names; its counts are complete


def check_watch_request(data: str | None, inbox: str | None, quiet_seconds: float) -> dict[str, Path]:
    """The folders to watch by role (`data`, `inbox`), after checking the request.

    Raises:
        ConfigError: No folder given, a folder missing, a bad quiet period, or no Prefect server.
    """
    from prefect.settings import PREFECT_API_URL

    folders = {role: Path(path).expanduser() for role, path in (("data", data), ("inbox", inbox)) if path}
    if not folders:
        raise ConfigError("watch needs --data, --inbox or both")
    for role, path in folders.items():
        if not path.is_dir():
            raise ConfigError(f"--{role} {path}: folder not found")
    check_number("--quiet-seconds", quiet_seconds, **QUIET_SECONDS_BOUNDS)
    if not PREFECT_API_URL.value():
        raise ConfigError(
            "watch sends events to a server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api, see README)"
        )
    return {role: path.resolve() for role, path in folders.items()}


def retrain_parameters(pairs: list[str], data: Path | None) -> dict:
    """The retrain's parameters from `NAME=VALUE` pairs (a JSON value, else text, as `prefect
    deployment run --param` reads them); each training-data event adds `data` and `skip_unchanged`,
    and the deployment's own parameters fill in the rest.

    Raises:
        ConfigError: A pair without `=`, a name train-cifar does not take, or pairs without --data.
    """
    import inspect

    from prefect.exceptions import ParameterTypeError

    from flows.train_cifar import train_cifar

    if pairs and data is None:
        raise ConfigError("--param sets the retrain's parameters: it needs --data")
    accepted = inspect.signature(train_cifar.fn).parameters
    parameters: dict = {}
    for pair in pairs:
        name, equals, raw = pair.partition("=")
        if not equals or name not in accepted:
            raise ConfigError(f"--param {pair!r}: expected NAME=VALUE with NAME one of {', '.join(accepted)}")
        try:
            parameters[name] = json.loads(raw)
        except json.JSONDecodeError:
            parameters[name] = raw
    # Typed as the deployment will type them, now: a bad value would otherwise fail every retrain it starts.
    flows_log = logging.getLogger("prefect.flows")  # which logs the same failure as a page of its own
    was_disabled, flows_log.disabled = flows_log.disabled, True
    try:
        train_cifar.validate_parameters(parameters)
    except ParameterTypeError as error:
        reasons = "; ".join(line.strip(" -") for line in str(error).splitlines()[1:])
        raise ConfigError(f"--param {reasons}") from None
    finally:
        flows_log.disabled = was_disabled
    return parameters


def watch_folders(
    folders: Mapping[str, Path],
    quiet_seconds: float,
    log: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    parameters: Mapping | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Send one event per quiet-ended burst of image changes in each folder, until `stop` is set.

    Args:
        parameters: The retrain's parameters that each training-data event carries (`retrain_parameters`).
        ready: Called once the folders are watched: from then on no new file is missed. (Said before the watcher
            was set up, "Watching" could come first, and a burst copied at once, on a loaded host, never became
            an event.) It comes with watchfiles' first answer: changes, or `quiet_seconds` without any.
    """
    from watchfiles import Change, watch

    pending: dict[str, dict[str, Change]] = {role: {} for role in folders}

    def relevant(change: Change, path: str) -> bool:
        parts = Path(path).parts
        return is_image_name(path) and not any(part.startswith(".") for part in parts)  # not temp or hidden files

    for changes in watch(
        *folders.values(), watch_filter=relevant, rust_timeout=int(quiet_seconds * 1000), yield_on_timeout=True,
        stop_event=stop,
    ):  # fmt: skip
        if ready is not None:
            ready()
            ready = None
        for change, path in changes:
            role, root = next((r, f) for r, f in folders.items() if Path(path).is_relative_to(f))
            pending[role][Path(path).relative_to(root).as_posix()] = change
        if changes:
            continue  # the burst goes on: wait for a quiet period
        for role, batch in pending.items():
            if batch:
                events = burst_events(role, folders[role], batch, parameters or {})
                asyncio.run(send_events(events))
                log(f"{role} {folders[role]}: {len(batch)} file change(s) -> {len(events)} {EVENTS[role]} event(s)")
                batch.clear()


def burst_events(role: str, root: Path, batch: Mapping[str, object], parameters: Mapping | None = None) -> list:
    """The events for one burst of changes (`relative path -> watchfiles.Change`) in one folder;
    a training-data event carries the retrain's `parameters`, which the deployment's trigger passes on."""
    from prefect.events import Event
    from watchfiles import Change

    resource = {"prefect.resource.id": f"cifar-pipeline.folder.{root}", "prefect.resource.name": root.name}
    present = sorted(path for path, change in batch.items() if change != Change.deleted and (root / path).is_file())
    if role == "inbox":
        return [
            Event(event=INBOX_EVENT, resource=resource,
                  payload={"folder": str(root), "files": present[i : i + FILES_PER_EVENT]})
            for i in range(0, len(present), FILES_PER_EVENT)
        ]  # fmt: skip
    counts = {
        kind: sum(change == getattr(Change, kind) for change in batch.values())
        for kind in ("added", "modified", "deleted")
    }
    payload = {
        "folder": str(root), **counts, "examples": sorted(batch)[:EXAMPLES],
        "parameters": {"data": str(root), "skip_unchanged": True, **(parameters or {})},
    }  # fmt: skip
    return [Event(event=TRAINING_EVENT, resource=resource, payload=payload)]


async def send_events(events: list) -> None:
    """Send events to the Prefect API now (not through the background worker, which a CLI may outlive)."""
    from prefect.events.clients import get_events_client

    async with get_events_client() as client:
        for event in events:
            await client.emit(event)
