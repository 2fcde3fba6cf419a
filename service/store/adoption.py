"""Adoption (``TASKGATE_ADOPT_FOREIGN``): rows for tasks sent around the gateway.

Before the recorder or the state feed applies a batch of updates, ``adopt`` inserts a row for
every update whose task the table does not have, from what the result document says of the
call (``TaskUpdate.origin``: Celery's ``result_extended`` name, args, kwargs and queue), in
one ``INSERT … ON CONFLICT (task_id) DO NOTHING``: a task the gateway enqueued is left alone,
and replicas adopting the same task at once insert it once. The row starts QUEUED, owned by
caller ``""`` (only callers with ``read_all`` read it), ``adopted`` set, never published by
the outbox (``publish_after`` NULL); the update applied next moves it on.

Not adopted: documents without a name (workers without ``result_extended``), Celery's own
tasks (``celery.*``: chord_unlock, backend_cleanup), ids or names longer than the columns.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.model import TaskState, TaskUpdate
from service.store.listing import transaction
from service.store.rows import without_nul
from service.store.tables import tasks

#: Task names never adopted: Celery's own tasks.
CELERY_INTERNAL_PREFIX = "celery."
#: The widths of ``tasks.task_id`` and ``tasks.task_name`` (``tables.py``).
TASK_ID_MAX, NAME_MAX = 64, 255


def _earliest(update: TaskUpdate) -> dt.datetime:
    """The earliest time the update knows of: the adopted row's create and run time."""
    known = [t for t in (update.observed_time, update.start_time, update.end_time) if t is not None]
    return min(known)


def adopted_row(update: TaskUpdate) -> dict[str, Any] | None:
    """The row to insert for an update of a task sent around the gateway; None when the
    update cannot be adopted (no origin, Celery's own task, too long for the columns)."""
    origin = update.origin
    if origin is None or origin.task_name.startswith(CELERY_INTERNAL_PREFIX):
        return None
    if len(update.task_id) > TASK_ID_MAX or len(origin.task_name) > NAME_MAX:
        return None
    first = _earliest(update)
    return {
        "task_id": update.task_id,
        "task_name": origin.task_name,
        "state": TaskState.QUEUED.value,
        "queue": origin.queue[:NAME_MAX],
        "args": without_nul(origin.args),
        "kwargs": without_nul(origin.kwargs),
        "options": {},
        "caller": "",
        "request_id": None,
        "fingerprint": "",
        "create_time": first,
        "run_time": first,
        "update_time": first,
        "publish_after": None,
        "adopted": True,
    }


class AdoptionStore:
    """Inserts the adopted rows of a batch of updates."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert = dialect.insert

    async def adopt(self, updates: Sequence[TaskUpdate]) -> int:
        """Insert a row for each update's task the table lacks; returns how many were new.

        One statement for the batch (none when no update carries an origin).

        Raises:
            DatabaseUnavailable: the database is unreachable.
            StatementRejected: the database refused the rows.
        """
        rows = [row for row in map(adopted_row, updates) if row is not None]
        if not rows:
            return 0
        statement: Any = (
            self._insert(tasks).values(rows).on_conflict_do_nothing(index_elements=[tasks.c.task_id])
        )
        async with transaction(self._engine) as conn:
            result = await conn.execute(statement)
        return int(result.rowcount or 0)


__all__ = ["AdoptionStore", "adopted_row"]
