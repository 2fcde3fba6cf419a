"""What operators ask the database: outbox and held counts, tasks per queue, and retention.

Each is one short statement. The counts read the partial indexes (``ix_tasks_outbox`` for
the outbox, ``ix_tasks_active`` for unfinished tasks); retention deletes terminal tasks in
small batches through ``ix_tasks_retention`` (migration 0007), each batch one statement
whose rows are taken with ``FOR UPDATE SKIP LOCKED``: replicas deleting at the same time
take different rows, and a row a recorder is writing is skipped, never waited for.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.model import TaskState
from service.store.listing import transaction
from service.store.tables import TERMINAL, tasks

#: The recorded states ListQueues counts per queue.
QUEUE_STATES = (TaskState.QUEUED.value, TaskState.SCHEDULED.value, TaskState.RUNNING.value)


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    """Tasks the database still has to hand to the broker."""

    #: due (run time reached) and not yet confirmed published
    pending: int
    #: kept until their run time
    held: int


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Recorded unfinished tasks of one queue ("" = the default queue)."""

    queue: str
    queued: int = 0
    scheduled: int = 0
    running: int = 0


class OperationsStore:
    """Counts and retention over the tasks table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def outbox_counts(self, now: dt.datetime) -> OutboxCounts:
        """How many tasks wait in the outbox (due) and how many are held (not yet due).

        Raises:
            DatabaseUnavailable: the database is unreachable.
        """
        due = tasks.c.run_time <= now
        query = sa.select(
            sa.func.count().filter(due),
            sa.func.count().filter(sa.not_(due)),
        ).where(tasks.c.publish_after.isnot(None))
        async with transaction(self._engine) as conn:
            pending, held = (await conn.execute(query)).one()
        return OutboxCounts(int(pending or 0), int(held or 0))

    async def queue_counts(self) -> list[QueueCounts]:
        """QUEUED, SCHEDULED and RUNNING tasks per queue, in queue order.

        Raises:
            DatabaseUnavailable: the database is unreachable.
        """
        query = (
            sa.select(tasks.c.queue, tasks.c.state, sa.func.count())
            .where(tasks.c.state.in_(QUEUE_STATES))
            .group_by(tasks.c.queue, tasks.c.state)
        )
        counts: dict[str, dict[str, int]] = {}
        async with transaction(self._engine) as conn:
            for queue, state, count in await conn.execute(query):
                counts.setdefault(queue, {})[state] = int(count)
        return [
            QueueCounts(
                queue,
                queued=states.get(TaskState.QUEUED.value, 0),
                scheduled=states.get(TaskState.SCHEDULED.value, 0),
                running=states.get(TaskState.RUNNING.value, 0),
            )
            for queue, states in sorted(counts.items())
        ]

    async def delete_finished(self, before: dt.datetime, limit: int) -> int:
        """Delete up to ``limit`` terminal tasks last updated before ``before``; returns how many.

        Raises:
            DatabaseUnavailable: the database is unreachable (nothing deleted).
        """
        batch = (
            sa.select(tasks.c.task_id)
            .where(tasks.c.state.in_(TERMINAL), tasks.c.update_time < before)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with transaction(self._engine) as conn:
            result = await conn.execute(sa.delete(tasks).where(tasks.c.task_id.in_(batch.scalar_subquery())))
        return int(result.rowcount or 0)
