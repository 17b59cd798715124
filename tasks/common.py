"""What every task and flow module shares: the run logger, the retry rule for flaky I/O, where results
are kept, and messages in a deployment run's words."""

from __future__ import annotations

import errno
import functools
import inspect
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path

from prefect import get_run_logger
from prefect.logging.handlers import APILogHandler
from prefect.runtime import deployment
from prefect.states import Completed

from model_lib.config import ConfigError, parameter_words
from model_lib.settings import RESULTS_FOLDER, is_url, work_dir


def log_info(message: str) -> None:
    """Log a line to the current Prefect run (shown in the UI and on the console)."""
    get_run_logger().info(message)


def finished(message: str, data) -> Completed:
    """A run's final state, its one-line outcome also logged (and sent before the state changes): `prefect
    deployment run --watch` streams a run's logs but never shows its state's message."""
    log_info(message)
    APILogHandler().flush()  # the handler sends in batches; the state change must not overtake the line
    return Completed(message=message, data=data)


def log_warning(message: str) -> None:
    """Log a warning to the current Prefect run."""
    get_run_logger().warning(message)


# OS errors that a retry cannot cure: the disk stays read-only, full or forbidden, the file missing.
PERMANENT_ERRNOS = frozenset(
    {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EISDIR, errno.ENOTDIR}
)


def retry_on_transient_io(task, task_run, state) -> bool:
    """Retry only transient I/O errors (a busy disk, a network share hiccup), never bad data, bad code,
    or a permanent condition such as a read-only file system, a full disk or a denied permission."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the state may carry no readable result; then do not retry blindly
        return False
    return isinstance(error, OSError) and error.errno not in PERMANENT_ERRNOS


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe its devices with the process's stderr closed: its C++ start-up notes
    (oneDNN, no CUDA driver) print before any log level applies. An import that fails still raises, after
    stderr is back. The CLI calls it before a run; a deployment's run, whose stderr is the worker's terminal,
    at its start."""
    from importlib.util import find_spec

    if "tensorflow" in sys.modules or find_spec("tensorflow") is None:  # none to quiet (JAX alone, or serving)
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow

        tensorflow.config.list_physical_devices("GPU")  # the CUDA probe's "failed call to cuInit" on a CPU host
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def check_deployment_storage() -> None:
    """A deployment run starts in a temporary folder of whichever worker picks it up (no checkout): an
    unset or relative ARTIFACTS_DIR would put its registry there and lose it when the run ends.

    Raises:
        ConfigError: In a deployment run, ARTIFACTS_DIR is unset or relative.
    """
    raw = os.environ.get("ARTIFACTS_DIR", "")
    if deployment.id:
        import_tensorflow_quietly()
    if deployment.id and not (is_url(raw) or os.path.isabs(raw.removeprefix("file://"))):
        raise ConfigError(
            f"ARTIFACTS_DIR is {raw or 'unset'!r} on this worker: a deployment run starts in a temporary folder, so "
            "set it, where the worker starts, to an absolute folder or an s3:// URL that every worker shares"
        )


def in_parameter_words(names: Mapping[str, str]):
    """Decorate a flow so that, in a deployment run, the library's messages name the flow's parameters (`data`,
    `output_csv`) where the CLI's options would be (`--data`, `--output`): `model_lib.config.option` words them.

    Args:
        names: Each field as the flow's parameter, keyed by the CLI's word (`model_lib.requests.parameter_names`).
    """

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not deployment.id:
                return function(*args, **kwargs)
            with parameter_words(names):
                return function(*args, **kwargs)

        # Types resolved here, in the flow's module: Prefect builds its parameter model from the
        # signature but resolves names in the wrapper's module.
        wrapper.__signature__ = inspect.signature(function, eval_str=True)
        wrapper.__annotations__ = typing.get_type_hints(function, include_extras=True)
        return wrapper

    return decorate


class WorkDirResults(type(Path())):
    """Prefect's result storage for the flows' return values: `work_dir()/prefect-results` (beside the
    registry when ARTIFACTS_DIR is local, else in the worker's cache). Prefect turns a path into its
    storage when a run starts, so this one is read then, not at import: the CLI and tests set
    ARTIFACTS_DIR after importing the flows. The stored path is absolute, so the API's
    `state.result()` reads it from any process on that machine."""

    def __str__(self) -> str:
        return str(work_dir() / RESULTS_FOLDER)

    def __fspath__(self) -> str:
        return str(self)


# For the flow decorators: JSON, never pickle (a result is read back by whoever asks the API).
KEPT_RESULTS = {"persist_result": True, "result_storage": WorkDirResults(), "result_serializer": "json"}
