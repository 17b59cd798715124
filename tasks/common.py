"""What every task module shares: the run logger and the retry rule for flaky I/O."""

from __future__ import annotations

from prefect import get_run_logger


def log_info(message: str) -> None:
    """Log a line to the current Prefect run (shown in the UI and on the console)."""
    get_run_logger().info(message)


def retry_on_transient_io(task, task_run, state) -> bool:
    """Retry only I/O errors (a busy disk, a network share hiccup), never bad data or bad code."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the state may carry no readable result; then do not retry blindly
        return False
    return isinstance(error, OSError)
