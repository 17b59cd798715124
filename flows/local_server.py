"""One local Prefect server per PREFECT_HOME, shared by the commands that run without PREFECT_API_URL.

`train` and `predict` used to start Prefect's temporary server each time and stop it at the end, so a
one-off prediction of 10 images paid more for its server than for classifying (issue 60). Prefect's
`prefect server start --background` would serve one, but on a fixed port (4200) another program may
hold, until someone stops it by hand, with no way to know whether a command still uses it. So, like
a build daemon:

- The first command starts the server in a session of its own (the terminal's Ctrl-C and the
  command's own stop never reach it), on a free loopback port, and waits until /health answers.
  The server writes its address to `PREFECT_HOME/cifar-pipeline-server/<key>/state.json`; the key
  names the Prefect version and database, so an upgrade or another database gets a server of its own.
- Each command holds a shared lock on `users.lock` for as long as its process lives. The server
  stops itself once nobody has held it for `CIFAR_PIPELINE_SERVER_IDLE_SECONDS` (default 600;
  0 stops it as soon as the last command ends).
- Starting happens under `start.lock`, so commands started together share one server. A state whose
  server is gone or does not answer is replaced; a server whose state names another stops as soon as
  its own users have finished.
- `cifar-pipeline server status` says where it is; `server stop` stops it now.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from model_lib.config import ConfigError
from model_lib.fileio import write_json

IDLE_ENV = "CIFAR_PIPELINE_SERVER_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 600.0
MAX_IDLE_SECONDS = 7 * 86400.0
START_SECONDS = 90  # at least, unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set (Prefect's 20 are
# short for a fresh database on 2 busy cores)
HEALTH_SECONDS = 5.0  # a server busy with another command's run may be slow to answer; it is not stale for that
CHECK_SECONDS = 0.5  # how often the server looks for users
STOP_SECONDS = 15.0  # `server stop`: how long its orderly shutdown may take
FOLDER = "cifar-pipeline-server"
STATE, USERS, START, LOG = "state.json", "users.lock", "start.lock", "server.log"

_users = None  # this process's open users.lock, held shared until the process ends


class LocalServerFailed(RuntimeError):
    """The local Prefect server did not start, or did not answer in time."""


def home_folder() -> Path:
    """This PREFECT_HOME's folder for the server of this Prefect version and database."""
    import prefect
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME

    identity = f"{prefect.__version__}\n{PREFECT_API_DATABASE_CONNECTION_URL.value()}"
    return Path(PREFECT_HOME.value()).expanduser() / FOLDER / hashlib.sha256(identity.encode()).hexdigest()[:12]


def idle_seconds() -> float:
    """CIFAR_PIPELINE_SERVER_IDLE_SECONDS, checked (a usage error names it)."""
    raw = os.environ.get(IDLE_ENV) or str(DEFAULT_IDLE_SECONDS)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_IDLE_SECONDS:  # NaN fails too
        raise ConfigError(f"{IDLE_ENV}={raw!r}: a number of seconds from 0 to {MAX_IDLE_SECONDS:.0f}")
    return value


def start_allowance() -> float:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT

    allowance = STARTUP_TIMEOUT.value()  # a value the user set is kept
    return allowance if STARTUP_TIMEOUT.name in os.environ else max(allowance, START_SECONDS)


def connect() -> tuple[str, bool]:
    """The API URL of this PREFECT_HOME's local server, and whether this call started it. From now until this
    process ends, the server counts it as a user and stays up.

    Raises:
        LocalServerFailed: No server answered and the one started here did not either.
    """
    idle_seconds()  # a bad value fails here, before a server starts with it
    here = home_folder()
    here.mkdir(parents=True, exist_ok=True)
    _hold(here)
    if state := _answering(here):
        return state["url"], False
    from filelock import FileLock

    with FileLock(here / START):  # whoever holds it is bounded by its own start allowance
        if state := _answering(here):
            return state["url"], False
        return _start(here, start_allowance()), True


def status() -> dict[str, Any] | None:
    """The state of the server that answers for this PREFECT_HOME, or None."""
    return _answering(home_folder())


def stop() -> dict[str, Any] | None:
    """Stop this PREFECT_HOME's server (commands using it lose it); its state, or None where none answered."""
    state = status()
    if state is None:
        return None
    with contextlib.suppress(ProcessLookupError):  # it answered just now, so the pid is still its own
        os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline and healthy(state["url"], timeout=1.0):
        time.sleep(0.1)
    return state


def read_state(here: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((here / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and {"pid", "url"} <= state.keys() else None


def healthy(url: str, timeout: float = HEALTH_SECONDS) -> bool:
    import httpx

    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.text.strip() == "true"


def _hold(here: Path) -> None:
    global _users
    if _users is None:
        _users = open(here / USERS, "a+b")  # noqa: SIM115 - held until the process ends
        fcntl.flock(_users, fcntl.LOCK_SH)  # waits only while a server is deciding to stop (milliseconds)


def _answering(here: Path) -> dict[str, Any] | None:
    """The state in `here` if its server answers."""
    state = read_state(here)
    return state if state and healthy(state["url"]) else None


def _start(here: Path, allowance: float) -> str:
    from prefect.settings import get_current_settings

    environment = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
    environment.pop("PREFECT_API_URL", None)
    with open(here / LOG, "wb") as log:  # this server's log only
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.local_server", str(here)],
            cwd=here,  # not the user's folder, whose own `flows` package would shadow this one
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + allowance
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalServerFailed(
                f"Prefect's local server did not start ({_last_error(here) or 'no answer'}); its database in "
                f"{here.parent.parent} may come from another Prefect version: set PREFECT_HOME to an empty folder, "
                "or PREFECT_API_URL to a running server"
            )
        state = read_state(here)
        if state and state["pid"] == process.pid and healthy(state["url"]):
            return state["url"]
        time.sleep(0.1)
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
    raise LocalServerFailed(
        f"Prefect's local server did not answer within {allowance:g} s (a busy or slow machine): set "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or PREFECT_API_URL to a running server"
    )


def _last_error(here: Path) -> str:
    """The log's last line that names an error, such as alembic's "Can't locate revision ..."."""
    with contextlib.suppress(OSError):
        lines = (here / LOG).read_text(errors="replace").splitlines()
        errors = [line.strip() for line in lines if "Error" in line and line.strip()]
        return errors[-1] if errors else ""
    return ""


def serve(here: Path) -> int:
    """The server process: Prefect's API on a free loopback port until unused (see the module docstring)."""
    import uvicorn
    from prefect.server.api.server import create_app

    idle = idle_seconds()
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    # As Prefect's temporary server: no UI, and the services that direct flow runs need.
    server = uvicorn.Server(uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error"))
    threading.Thread(target=_keep, args=(server, here, url, idle), name="idle-stop", daemon=True).start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # uvicorn shuts down on these, then raises them again for the handlers it found: with these, the
        # process goes on to withdraw its state rather than dying first.
        signal.signal(signum, lambda *_: None)
    try:
        server.run(sockets=[listener])
    finally:
        _forget(here)
    return 0 if server.started else 3


def _keep(server, here: Path, url: str, idle: float) -> None:
    """Publish the address once the server answers, then stop it once it is unused."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    write_json(here / STATE, {"pid": os.getpid(), "url": url, "idle_seconds": idle, "started": time.time()})
    with open(here / USERS, "a+b") as users:
        last_used = time.monotonic()
        while not server.should_exit:
            time.sleep(CHECK_SECONDS)
            if _in_use(users):
                last_used = time.monotonic()
                continue
            if (not _ours(here) or time.monotonic() - last_used >= idle) and _release(here, users):
                server.should_exit = True


def _in_use(users) -> bool:
    if not _lock_if_unused(users):
        return True
    fcntl.flock(users, fcntl.LOCK_UN)
    return False


def _lock_if_unused(users) -> bool:
    """Take `users.lock` exclusively if no command holds it; whether it was taken."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _release(here: Path, users) -> bool:
    """Withdraw the state, unless a command came meanwhile: under both locks, none can be reading it."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(here / START, timeout=1):
            if not _lock_if_unused(users):
                return False
            try:
                _forget(here)
            finally:
                fcntl.flock(users, fcntl.LOCK_UN)
    except Timeout:
        return False  # a command is starting a server: look again next time
    return True


def _ours(here: Path) -> bool:
    """Whether the state names this process."""
    return (read_state(here) or {}).get("pid") == os.getpid()


def _forget(here: Path) -> None:
    """Remove the state if it names this process."""
    if _ours(here):
        with contextlib.suppress(FileNotFoundError):
            (here / STATE).unlink()


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
