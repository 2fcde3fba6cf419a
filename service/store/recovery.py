"""What the recovery pass reads and writes: tasks lost with their worker or by the broker.

Portable SQLAlchemy statements (PostgreSQL and SQLite): the pass runs every few seconds,
not on the hot path, and reads only unfinished rows (``ix_tasks_active``). Every write is
conditional on the row still being what the pass saw, so a worker's update that lands
between the read and the write wins. Errors are the store's (``errors.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.domain.model import TaskError, TaskState, TaskUpdate
from service.store.errors import statement_errors, unavailable
from service.store.tables import tasks, workers
from service.store.transition import not_terminal, update_values

_RUNNING = TaskState.RUNNING.value
_WAITING = (TaskState.QUEUED.value, TaskState.SCHEDULED.value)


@dataclass(frozen=True, slots=True)
class LostCandidate:
    """An unfinished task the recovery pass looks at: its id, name and queue."""

    task_id: str
    task_name: str
    queue: str


@dataclass(frozen=True, slots=True)
class StaleRun:
    """A RUNNING task nothing was heard of for a while: its id, name, queue, the worker
    that started it and its attempt (``retries``, as its run claim is keyed)."""

    task_id: str
    task_name: str
    queue: str
    worker: str
    retries: int


def _in_order(task_ids: list[str]) -> sa.ColumnElement[bool]:
    """``task_id`` is one of ``task_ids``, the rows locked in task_id order (as every other
    multi-row UPDATE of the store locks them: no deadlock with the recorder's)."""
    locked = sa.select(tasks.c.task_id).where(tasks.c.task_id.in_(task_ids)).order_by(tasks.c.task_id)
    return tasks.c.task_id.in_(locked.with_for_update())


def _not_updated_since(updated_before: dt.datetime | None) -> sa.ColumnElement[bool]:
    """The row was last updated before ``updated_before`` (None: no condition)."""
    if updated_before is None:
        return sa.true()
    return tasks.c.update_time <= updated_before


class RecoveryStore:
    """The recovery pass's reads and conditional writes on the ``tasks`` and ``workers`` tables."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction; failing to get one is ``DatabaseUnavailable``."""
        with statement_errors():
            connected = False
            try:
                async with self._engine.connect() as conn:
                    connected = True
                    async with conn.begin():
                        yield conn
            except Exception as exc:
                if connected:
                    raise
                raise unavailable(exc) from exc

    async def running_workers(self) -> set[str]:
        """The workers (Celery node names) RUNNING tasks last started on."""
        query = (
            sa.select(tasks.c.worker).distinct().where(tasks.c.state == _RUNNING, tasks.c.worker.isnot(None))
        )
        async with self._begin() as conn:
            return {str(name) for name in (await conn.execute(query)).scalars()}

    async def saw_heartbeats(self, hostnames: Collection[str], now: dt.datetime) -> None:
        """Record that these workers' heartbeats were seen at ``now`` (they are watched from
        then on, by every gateway of the deployment)."""
        if not hostnames:
            return
        rows = [{"hostname": name, "heartbeat_time": now} for name in sorted(hostnames)]
        async with self._begin() as conn:
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            statement = insert(workers).values(rows)
            upsert = statement.on_conflict_do_update(
                index_elements=[workers.c.hostname],
                set_={"heartbeat_time": statement.excluded.heartbeat_time},
            )
            await conn.execute(upsert)

    async def watched(self, hostnames: Collection[str]) -> set[str]:
        """Those of ``hostnames`` whose heartbeat was ever seen."""
        if not hostnames:
            return set()
        query = sa.select(workers.c.hostname).where(workers.c.hostname.in_(list(hostnames)))
        async with self._begin() as conn:
            return {str(name) for name in (await conn.execute(query)).scalars()}

    async def known_workers(self) -> set[str]:
        """Every worker whose heartbeat was ever seen (``saw_heartbeats``): the workers a
        decision that needs every live worker's answer must hear from."""
        async with self._begin() as conn:
            return {str(name) for name in (await conn.execute(sa.select(workers.c.hostname))).scalars()}

    async def running_on(self, worker: str, limit: int) -> list[LostCandidate]:
        """Up to ``limit`` tasks RUNNING on ``worker``."""
        query = (
            sa.select(tasks.c.task_id, tasks.c.task_name, tasks.c.queue)
            # adopted tasks were sent around the gateway: their messages are not ours to resend
            .where(tasks.c.state == _RUNNING, tasks.c.worker == worker, sa.not_(tasks.c.adopted))
            .order_by(tasks.c.task_id)
            .limit(limit)
        )
        async with self._begin() as conn:
            return [LostCandidate(*row) for row in (await conn.execute(query)).all()]

    async def requeue(
        self,
        task_ids: Iterable[str],
        worker: str,
        now: dt.datetime,
        updated_before: dt.datetime | None = None,
    ) -> list[str]:
        """Put tasks still RUNNING on ``worker`` (and, with ``updated_before``, not updated
        since) back in the outbox, QUEUED with a fresh publish mark (due now) and no worker
        or start; returns the ids this call changed, sorted (UPDATE … RETURNING: of two
        replicas making the same decision, only the one whose write landed gets them, so only
        it clears the run's leftovers)."""
        ids = list(task_ids)
        if not ids:
            return []
        statement = (
            tasks.update()
            .where(_in_order(ids), tasks.c.state == _RUNNING, tasks.c.worker == worker)
            .where(_not_updated_since(updated_before))
            .values(
                state=TaskState.QUEUED.value,
                update_time=now,
                start_time=None,
                worker=None,
                publish_after=now,
                publish_time=None,
            )
            .returning(tasks.c.task_id)
        )
        async with self._begin() as conn:
            return sorted(str(task_id) for task_id in (await conn.execute(statement)).scalars())

    async def fail(
        self,
        task_ids: Iterable[str],
        worker: str,
        error: TaskError,
        now: dt.datetime,
        updated_before: dt.datetime | None = None,
    ) -> int:
        """End tasks still RUNNING on ``worker`` (and, with ``updated_before``, not updated
        since) FAILED with ``error`` (by the transition rule, as a worker's FAILURE would);
        returns how many."""
        changed = 0
        async with self._begin() as conn:
            for task_id in sorted(task_ids):
                update = TaskUpdate(task_id, TaskState.FAILED, now, error=error)
                statement = (
                    tasks.update()
                    .where(tasks.c.task_id == task_id, tasks.c.worker == worker, tasks.c.state == _RUNNING)
                    .where(not_terminal(), _not_updated_since(updated_before))
                    .values(update_values(update))
                )
                changed += int((await conn.execute(statement)).rowcount)
        return changed

    async def stale_running(self, updated_before: dt.datetime, limit: int) -> list[StaleRun]:
        """Up to ``limit`` RUNNING tasks that name their worker and were last updated before
        ``updated_before``, the longest silent first (adopted tasks left out, as in
        ``running_on``)."""
        query = (
            sa.select(tasks.c.task_id, tasks.c.task_name, tasks.c.queue, tasks.c.worker, tasks.c.retries)
            .where(
                tasks.c.state == _RUNNING,
                tasks.c.worker.isnot(None),
                tasks.c.update_time <= updated_before,
                sa.not_(tasks.c.adopted),
            )
            .order_by(tasks.c.update_time, tasks.c.task_id)
            .limit(limit)
        )
        async with self._begin() as conn:
            return [StaleRun(*row) for row in (await conn.execute(query)).all()]

    async def settle(self, updates: Iterable[TaskUpdate]) -> int:
        """Apply worker updates (stored result documents) to their unfinished tasks, by the
        transition rule; returns how many rows changed."""
        changed = 0
        async with self._begin() as conn:
            for update in sorted(updates, key=lambda update: update.task_id):
                statement = (
                    tasks.update()
                    .where(tasks.c.task_id == update.task_id, not_terminal())
                    .values(update_values(update))
                )
                changed += int((await conn.execute(statement)).rowcount)
        return changed

    async def waiting(self, published_before: dt.datetime, limit: int) -> list[LostCandidate]:
        """Up to ``limit`` QUEUED or SCHEDULED tasks published (and due) before
        ``published_before`` that no worker has reported on, oldest publish first."""
        query = (
            sa.select(tasks.c.task_id, tasks.c.task_name, tasks.c.queue)
            .where(
                tasks.c.state.in_(_WAITING),
                tasks.c.publish_after.is_(None),
                tasks.c.publish_time <= published_before,
                tasks.c.run_time <= published_before,
            )
            .order_by(tasks.c.publish_time)
            .limit(limit)
        )
        async with self._begin() as conn:
            return [LostCandidate(*row) for row in (await conn.execute(query)).all()]

    async def republish(
        self, task_ids: Iterable[str], published_before: dt.datetime, now: dt.datetime
    ) -> int:
        """Put tasks still waiting since before ``published_before`` back in the outbox with
        a fresh publish mark (due now); returns how many."""
        ids = list(task_ids)
        if not ids:
            return 0
        statement = (
            tasks.update()
            .where(
                _in_order(ids),
                tasks.c.state.in_(_WAITING),
                tasks.c.publish_after.is_(None),
                tasks.c.publish_time <= published_before,
            )
            .values(publish_after=now, publish_time=None)
        )
        async with self._begin() as conn:
            return int((await conn.execute(statement)).rowcount)
