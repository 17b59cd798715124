"""What every task module shares: the run logger and the retry rule for flaky I/O."""

from __future__ import annotations

import errno

from prefect import get_run_logger


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
