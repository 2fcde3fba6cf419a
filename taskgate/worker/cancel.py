"""Cooperative cancellation for tasks the gateway may cancel.

CancelTask sets a durable mark in the result backend's Redis
(``RedisKeys.cancel_mark``). Workers look for it:

- before running a task (the run-once guard calls ``check_cancel``): a task cancelled
  while it waited in the broker is skipped, also by a worker that was down when it was
  cancelled;
- at every ``report_progress()`` (which calls ``check_cancel``): a running task stops at
  its next report;
- whenever a task's own loop asks ``cancel_requested()`` (for loops that report nothing).

``check_cancel`` writes REVOKED to the result backend (the gateway then shows CANCELLED)
and raises ``TaskCancelled``, a Celery ``Ignore``: the task may catch it to clean up and
must re-raise it; Celery then stores nothing more for the run.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_task
from celery.exceptions import Ignore

from taskgate.worker.contract import RedisKeys

log = logging.getLogger(__name__)


class TaskCancelled(Ignore):
    """The task was cancelled through the gateway; raised at a cancellation checkpoint.

    Attributes:
        reason: The reason given to CancelTask (may be empty).
    """

    def __init__(self, task_id: str, reason: str = "") -> None:
        super().__init__(f"task {task_id} was cancelled" + (f": {reason}" if reason else ""))
        self.task_id = task_id
        self.reason = reason


def _running(task: Any | None) -> Any | None:
    """The task to check: ``task``, else the current one; None outside a real run."""
    task = task if task is not None else current_task
    if task is None:
        return None
    request = task.request
    if not request.id or request.called_directly or request.is_eager:
        return None
    return task


def _mark(task: Any) -> str | None:
    """The cancellation mark's value (the reason) for the task's id; None when unmarked."""
    from taskgate.worker.guard import app_key_prefix  # guard imports this module

    client: Any = getattr(task.backend, "client")  # noqa: B009 - untyped in the stubs
    value = client.get(RedisKeys(app_key_prefix(task.app)).cancel_mark(task.request.id))
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def cancel_requested(task: Any | None = None) -> bool:
    """True once CancelTask was called for the running task (``task``, else the current one).

    For loops that report no progress::

        for item in items:
            if cancel_requested():
                cleanup()
                raise TaskCancelled(self.request.id)   # or: check_cancel()
            handle(item)

    Outside a task (a plain function call, eager mode) it is always False.
    """
    running = _running(task)
    return running is not None and _mark(running) is not None


def cancelled_before_start(task: Any) -> bool:
    """True when ``task``'s delivery carries a cancellation mark (read a few times if Redis
    blinks; unreadable: False, and the checkpoint in ``OnceTask.__call__`` looks again)."""
    from taskgate.worker.retry import bounded, is_transient

    try:
        return bounded(lambda: _mark(task) is not None, what=f"task_id={task.request.id} cancel mark")
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("task_id=%s: cancel mark unreadable (%s); running it", task.request.id, exc)
        return False


def check_cancel(task: Any | None = None) -> None:
    """A cancellation checkpoint: do nothing, unless the task was cancelled through the
    gateway; then write REVOKED for it and raise ``TaskCancelled``.

    Raises:
        TaskCancelled: the task's cancellation mark is set.
    """
    running = _running(task)
    if running is None:
        return
    reason = _mark(running)
    if reason is None:
        return
    task_id = running.request.id
    log.warning("task_id=%s cancelled through the gateway%s", task_id, f": {reason}" if reason else "")
    running.backend.mark_as_revoked(task_id, reason or "cancelled", request=running.request)
    raise TaskCancelled(task_id, reason)
