"""What every task module shares: the run logger and the retry rule for flaky I/O."""

from __future__ import annotations

import errno
import os

from prefect import get_run_logger
from prefect.runtime import deployment

from model_lib.config import ConfigError
from model_lib.settings import is_url


def log_info(message: str) -> None:
    """Log a line to the current Prefect run (shown in the UI and on the console)."""
    get_run_logger().info(message)


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


def check_deployment_storage() -> None:
    """A deployment run starts in a temporary folder of whichever worker picks it up (no checkout): an
    unset or relative ARTIFACTS_DIR would put its registry there and lose it when the run ends.

    Raises:
        ConfigError: In a deployment run, ARTIFACTS_DIR is unset or relative.
    """
    raw = os.environ.get("ARTIFACTS_DIR", "")
    if deployment.id and not (is_url(raw) or os.path.isabs(raw.removeprefix("file://"))):
        raise ConfigError(
            f"ARTIFACTS_DIR is {raw or 'unset'!r} on this worker: a deployment run starts in a temporary folder, so "
            "set it, where the worker starts, to an absolute folder or an s3:// URL that every worker shares"
        )
