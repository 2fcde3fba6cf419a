"""CancelTask's writes: record the request, and end at once a task that cannot have started.

One transaction per cancel, the row locked (``FOR UPDATE``) so that a concurrent outbox
claim or recorder write waits for it. A task the broker never had (held for the future, or
still in the outbox: ``publish_time`` is NULL) leaves the outbox here (``publish_after``
NULL) and becomes CANCELLED: the relay never publishes it. A fast-path publish already in
flight may still reach the broker: the worker's check of the cancellation mark skips it.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.model import TaskRecord, TaskState
from service.store.listing import record_with_marks, transaction
from service.store.tables import TERMINAL, tasks

#: States in which a published task has not been seen starting.
NOT_STARTED = (TaskState.QUEUED.value, TaskState.SCHEDULED.value, TaskState.WAITING.value)


class CancelStore:
    """Reads a task for CancelTask and records the cancel request."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task with its cancel mark, or None."""
        async with transaction(self._engine) as conn:
            row = (await conn.execute(sa.select(tasks).where(tasks.c.task_id == task_id))).mappings().first()
        return None if row is None else record_with_marks(row)

    async def cancel(self, task_id: str, now: dt.datetime, *, not_started: bool) -> TaskRecord | None:
        """Record a cancel request for a task that is not terminal.

        Args:
            task_id: The task.
            now: The time of the request (the end time of a task cancelled at once).
            not_started: The result backend shows no start of the task (nor is it down):
                a published task still QUEUED or SCHEDULED then also ends CANCELLED at once.

        Returns:
            The task after the request; None when there is no such task. A terminal task is
            returned unchanged.

        Raises:
            DatabaseUnavailable: the database is unreachable; nothing was recorded.
        """
        async with transaction(self._engine) as conn:
            locked = sa.select(tasks).where(tasks.c.task_id == task_id).with_for_update()
            row = (await conn.execute(locked)).mappings().first()
            if row is None or row["state"] in TERMINAL:
                return None if row is None else record_with_marks(row)
            values: dict[str, object] = {"cancel_requested": True, "update_time": now}
            unpublished = row["publish_time"] is None
            if unpublished or (not_started and row["state"] in NOT_STARTED):
                values.update(state=TaskState.CANCELLED.value, end_time=now, publish_after=None)
            statement = tasks.update().where(tasks.c.task_id == task_id).values(values).returning(*tasks.c)
            updated = (await conn.execute(statement)).mappings().one()
        return record_with_marks(updated)
