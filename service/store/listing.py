"""ListTasks's query: a filter tree as bound SQL, one page by keyset from an index.

Pages are ordered by ``(create_time, task_id)`` (descending by default) and a page starts
strictly after the previous page's last key, so a task created between two pages is never
repeated and none is skipped: it sorts before the first page (newest first) or after the
last (oldest first). The indexes of migration 0003 serve every page: ``ix_tasks_list``,
``ix_tasks_list_caller`` (a caller that reads only its own tasks) and
``ix_tasks_list_state`` (a state filter). Every value is a bound parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.domain.model import TaskRecord, TaskState
from service.domain.query import All, Compare, Expr, Field, Not, Op, TaskQuery
from service.domain.query import Any as AnyOf
from service.store.errors import connecting, statement_errors
from service.store.rows import record_of
from service.store.tables import tasks

_COLUMNS: dict[Field, sa.ColumnElement[Any]] = {
    Field.STATE: tasks.c.state,
    Field.TASK_NAME: tasks.c.task_name,
    Field.QUEUE: tasks.c.queue,
    Field.REQUEST_ID: sa.func.coalesce(tasks.c.request_id, ""),
    Field.CREATE_TIME: tasks.c.create_time,
    Field.END_TIME: tasks.c.end_time,
    # `= "x"` on the bare column (not coalesced) so the partial ix_tasks_list_* index serves it
    Field.SCHEDULE_ID: tasks.c.schedule_id,
    Field.WORKFLOW_ID: tasks.c.workflow_id,
}

#: Columns that are NULL for tasks that belong to nothing (NULL must still be "not equal").
_LINKS = frozenset({Field.SCHEDULE_ID, Field.WORKFLOW_ID})


@contextlib.asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction, committed when the block ends without error; no
    connection is ``DatabaseUnavailable``, a refused statement ``StatementRejected``."""
    with connecting():
        conn = await engine.connect()
    try:
        with statement_errors():
            async with conn.begin():
                yield conn
    finally:
        await conn.close()


def record_with_marks(row: Any) -> TaskRecord:
    """The record of a row, with its ``cancel_requested`` mark."""
    return dataclasses.replace(record_of(row), cancel_requested=bool(row["cancel_requested"]))


def _compare(node: Compare, now: dt.datetime) -> sa.ColumnElement[bool]:
    if node.field is Field.STATE:
        return _state(node, now)
    column = _COLUMNS[node.field]
    if node.prefix:
        match = column.startswith(str(node.value), autoescape=True)
        if node.op is Op.EQ:
            return match
        return sa.or_(column.is_(None), sa.not_(match)) if node.field in _LINKS else sa.not_(match)
    value = node.value
    clauses = {
        Op.EQ: column == value,
        Op.NE: column != value,
        Op.LT: column < value,
        Op.LE: column <= value,
        Op.GT: column > value,
        Op.GE: column >= value,
    }
    clause = clauses[node.op]
    if node.field in _LINKS and node.op is Op.NE:
        clause = sa.or_(column.is_(None), clause)  # a task of no schedule is != any schedule
    if node.field is Field.END_TIME:  # an unfinished task has no end: no comparison holds
        clause = sa.and_(tasks.c.end_time.isnot(None), clause)
    return clause


def _state(node: Compare, now: dt.datetime) -> sa.ColumnElement[bool]:
    """A state comparison as callers see states: a SCHEDULED task whose run time has come
    reads QUEUED (``TaskRecord.as_of``)."""
    state = TaskState(str(node.value))
    due = tasks.c.run_time <= now
    if state is TaskState.QUEUED:
        match = sa.or_(tasks.c.state == state.value, sa.and_(tasks.c.state == TaskState.SCHEDULED.value, due))
    elif state is TaskState.SCHEDULED:
        match = sa.and_(tasks.c.state == state.value, sa.not_(due))
    else:
        match = tasks.c.state == state.value
    return match if node.op is Op.EQ else sa.not_(match)


def where_of(expr: Expr, now: dt.datetime) -> sa.ColumnElement[bool]:
    """The SQL condition of a filter tree (every value bound as a parameter)."""
    if isinstance(expr, Compare):
        return _compare(expr, now)
    if isinstance(expr, All):
        return sa.and_(*(where_of(part, now) for part in expr.parts))
    if isinstance(expr, AnyOf):
        return sa.or_(*(where_of(part, now) for part in expr.parts))
    if isinstance(expr, Not):
        return sa.not_(where_of(expr.part, now))
    raise TypeError(f"not a filter node: {expr!r}")


def select_page(query: TaskQuery, now: dt.datetime) -> sa.Select[Any]:
    """The SELECT of one page."""
    key = sa.tuple_(tasks.c.create_time, tasks.c.task_id)
    where: list[sa.ColumnElement[bool]] = []
    if query.owner is not None:
        where.append(tasks.c.caller == query.owner)
    if query.filter is not None:
        where.append(where_of(query.filter, now))
    if query.after is not None:
        after = sa.tuple_(
            sa.literal(query.after.create_time, tasks.c.create_time.type), sa.literal(query.after.task_id)
        )
        where.append(key < after if query.newest_first else key > after)
    if query.newest_first:
        order = (tasks.c.create_time.desc(), tasks.c.task_id.desc())
    else:
        order = (tasks.c.create_time.asc(), tasks.c.task_id.asc())
    return sa.select(tasks).where(*where).order_by(*order).limit(query.limit)


class TaskListing:
    """Reads pages of tasks (the ListTasks port's SQL implementation)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def page(self, query: TaskQuery, now: dt.datetime) -> list[TaskRecord]:
        """Up to ``query.limit`` tasks matching ``query``, in its order, after its key.

        Raises:
            DatabaseUnavailable: the database is unreachable.
        """
        async with transaction(self._engine) as conn:
            rows = (await conn.execute(select_page(query, now))).mappings().all()
        return [record_with_marks(row) for row in rows]
