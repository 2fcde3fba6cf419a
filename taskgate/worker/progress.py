"""The helper task authors call to report progress."""

from __future__ import annotations

import logging
from typing import Any

from celery import current_task

from taskgate.worker.cancel import TaskCancelled, check_cancel
from taskgate.worker.contract import PROGRESS_STATE
from taskgate.worker.retry import bounded, is_transient

log = logging.getLogger(__name__)

#: Tries of one progress write: 6 tries span about 3 s of backoff (0.1 s doubling to 1.6 s).
PROGRESS_ATTEMPTS = 6


def report_progress(current: float, total: float = 0, message: str = "", **details: Any) -> None:
    """Record how far the running task has come.

    Writes a ``PROGRESS`` state to the result backend (which also publishes it and, with
    ``taskgate.worker.configure``, appends it to the state feed), so every
    ``StreamProgress`` caller sees it and the gateway records it. Outside a task it does
    nothing, so the plain functions that call it stay testable.

    Progress is advisory: when Redis cannot be reached the write is tried again a few
    times (about 3 s in all), then logged and given up, and the task goes on — its final
    state is what must be stored, and the backend keeps retrying that one longer.

    Raises:
        Exception: whatever Celery raises for a document it cannot encode (``details``
            that are not JSON-serialisable); never for Redis being unreachable.

    Args:
        current: units done so far, in the task's own unit.
        total: units in all; 0 when not known.
        message: a human-readable line about the current step.
        **details: extra JSON-serialisable fields for the caller.
    """
    task = current_task
    if task is None or not task.request.id:
        return
    meta = {"current": current, "total": total, "message": message, "details": details}
    task_id = task.request.id
    _checkpoint(task)
    try:
        # max_retries=0: this loop, not the backend's longer one, bounds a progress write
        bounded(
            lambda: task.update_state(state=PROGRESS_STATE, meta=meta, max_retries=0),
            what=f"task_id={task_id} progress {current}/{total}",
            attempts=PROGRESS_ATTEMPTS,
        )
    except Exception as exc:
        if not is_transient(exc):
            raise  # a document that cannot be stored is the task's own error
        log.warning(
            "task_id=%s: progress %s/%s not stored (%s); the task goes on", task_id, current, total, exc
        )


def _checkpoint(task: Any) -> None:
    """Every report is a cancellation checkpoint (``TaskCancelled`` once CancelTask was
    called); a Redis blink while looking is not a cancellation and never kills the task."""
    try:
        check_cancel(task)
    except TaskCancelled:
        raise
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("task_id=%s: cancel mark unreadable (%s); the task goes on", task.request.id, exc)
