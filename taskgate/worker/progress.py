"""The helper task authors call to report progress."""

from __future__ import annotations

from typing import Any

from celery import current_task

from taskgate.worker.contract import PROGRESS_STATE


def report_progress(current: float, total: float = 0, message: str = "", **details: Any) -> None:
    """Record how far the running task has come.

    Writes a ``PROGRESS`` state to the result backend (which also publishes it), so every
    ``StreamProgress`` caller sees it and the gateway records it. Outside a task it does
    nothing, so the plain functions that call it stay testable.

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
    task.update_state(state=PROGRESS_STATE, meta=meta)
