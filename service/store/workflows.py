"""The workflows table, and a workflow's steps (tasks rows with ``workflow_id``) as one.

A workflow and all its steps are recorded in one transaction (``insert``): the entry
steps QUEUED with their outbox mark, the others WAITING without one but with a
``publish_time`` (the workers send them: to CancelTask and the reconcile they are
published tasks, read from Redis like any other). The tree is stored without the fields at
their defaults (``stored_tree``; ``from_json`` reads either form).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.domain.errors import RequestIdConflict
from service.domain.model import TaskError, TaskRecord, TaskState
from service.domain.workflow import ChainStep, Step, TaskStep, WorkflowRecord, from_json
from service.store import postgres
from service.store.listing import record_with_marks, transaction
from service.store.rows import NewTask, insert_row, vars_of
from service.store.rows import any_json as json_text
from service.store.tables import TERMINAL, JSONType, UTCDateTime, tasks

#: The states a step that never ran may read (see ``cancel_stopped``).
_STOPPABLE = (TaskState.WAITING.value, TaskState.FAILED.value)
#: The states of a step that stop the steps after it.
_STOPPERS = (TaskState.FAILED.value, TaskState.CANCELLED.value)

workflows = sa.Table(
    "workflows",
    sa.MetaData(),
    sa.Column("workflow_id", sa.String(64), primary_key=True),
    sa.Column("caller", sa.String(255), nullable=False, server_default=""),
    sa.Column("request_id", sa.String(255), nullable=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("tree", JSONType, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("create_time", UTCDateTime, nullable=False),
    sa.Column("end_time", UTCDateTime, nullable=True),
)


_COLUMNS = ("workflow_id", "caller", "request_id", "fingerprint", "tree", "state", "create_time")
_INSERT = f"INSERT INTO workflows ({', '.join(_COLUMNS)}) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)"


def _record(row: Mapping[Any, Any]) -> WorkflowRecord:
    return WorkflowRecord(
        workflow_id=row["workflow_id"],
        caller=row["caller"],
        request_id=row["request_id"] or "",
        fingerprint=row["fingerprint"],
        root=from_json(row["tree"]),
        state=TaskState(row["state"]),
        create_time=row["create_time"],
        end_time=row["end_time"],
    )


#: A task step's fields at their defaults: left out of the stored tree (``from_json`` puts
#: them back).
_DEFAULTS: dict[str, Any] = {
    "args": [],
    "kwargs": {},
    "queue": "",
    "priority": None,
    "headers": {},
    "time_limit": None,
    "soft_time_limit": None,
    "expire_after": None,
    "immutable": False,
}


def stored_tree(step: Step) -> dict[str, Any]:
    """The tree as the workflows table keeps it: ``to_json`` without the fields at their
    defaults (a group of 1,000 tasks: a third of the bytes)."""
    if isinstance(step, TaskStep):
        body: dict[str, Any] = {"task_name": step.task_name}
        for name, default in _DEFAULTS.items():
            value = getattr(step, name)
            if value != default:
                body[name] = value
        body["task_id"] = step.task_id
        return {"task": body}
    children = [stored_tree(child) for child in step.steps]
    if isinstance(step, ChainStep):
        return {"chain": children}
    return {"group": children, "group_id": step.group_id}


def _changed_since(since: dt.datetime) -> sa.CompoundSelect[tuple[Any]]:
    """The workflow ids of the steps changed at or after ``since``: one select per partial
    index on ``update_time`` (unfinished tasks, finished tasks), so neither scans the table."""
    changed = tasks.c.update_time >= since
    linked = tasks.c.workflow_id.isnot(None)
    return sa.union_all(
        sa.select(tasks.c.workflow_id).where(changed, tasks.c.state.notin_(TERMINAL), linked),
        sa.select(tasks.c.workflow_id).where(changed, tasks.c.state.in_(TERMINAL), linked),
    )


class WorkflowStore:
    """Reads and writes workflows and their steps."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"

    async def insert(self, workflow: WorkflowRecord, steps: Sequence[NewTask]) -> WorkflowRecord | None:
        """Record a workflow and every step, all or nothing.

        Returns:
            None for a new workflow; the original for a request_id used before with the
            same workflow (nothing is recorded then).

        Raises:
            RequestIdConflict: the request_id was used before for another workflow.
            DatabaseUnavailable: nothing was recorded.
        """
        tree = stored_tree(workflow.root)
        async with transaction(self._engine) as conn:
            if not workflow.request_id:  # no unique key to race for: no savepoint
                await self._insert(conn, workflow, steps, tree)
                return None
            original = await self._original(conn, workflow)
            if original is not None:
                return original
            try:
                async with conn.begin_nested():
                    await self._insert(conn, workflow, steps, tree)
            except sa.exc.IntegrityError:
                original = await self._original(conn, workflow)
                if original is None:
                    raise
                return original
        return None

    async def _insert(
        self, conn: AsyncConnection, workflow: WorkflowRecord, steps: Sequence[NewTask], tree: dict[str, Any]
    ) -> None:
        values = (
            workflow.workflow_id,
            workflow.caller,
            workflow.request_id or None,
            workflow.fingerprint,
            tree,
            workflow.state.value,
            workflow.create_time,
        )
        if self._postgres:  # the tree of 1,000 steps: orjson and one statement on the driver
            await postgres.driver_execute(conn, _INSERT, *values[:4], json_text(tree), *values[5:])
            await postgres.insert_rows(conn, steps)
        else:
            await conn.execute(workflows.insert().values(dict(zip(_COLUMNS, values, strict=True))))
            await conn.execute(tasks.insert(), [insert_row(new) for new in steps])
        if any(new.state is TaskState.WAITING for new in steps):
            await conn.execute(
                tasks.update()
                .where(tasks.c.workflow_id == workflow.workflow_id, tasks.c.state == TaskState.WAITING.value)
                .values(publish_time=tasks.c.create_time)
            )

    async def _original(self, conn: AsyncConnection, workflow: WorkflowRecord) -> WorkflowRecord | None:
        query = sa.select(workflows).where(
            workflows.c.caller == workflow.caller, workflows.c.request_id == workflow.request_id
        )
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        if row["fingerprint"] != workflow.fingerprint:
            raise RequestIdConflict(
                f"request_id {workflow.request_id!r} was already used for a different workflow "
                f"({row['workflow_id']}); use a new request_id for a new workflow"
            )
        return _record(row)

    async def get(self, workflow_id: str) -> WorkflowRecord | None:
        """The workflow, or None."""
        async with transaction(self._engine) as conn:
            query = sa.select(workflows).where(workflows.c.workflow_id == workflow_id)
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else _record(row)

    async def version(self, workflow_id: str) -> tuple[Any, ...] | None:
        """A value that changes whenever the workflow's state or any step's row changes
        (its state, progress, result, cancel mark: each moves the row's ``update_time``),
        read without reading the steps; None where the database cannot tell (not
        PostgreSQL: read the steps every time).

        The sum of the steps' ``update_time`` changes with any one of them, whichever clock
        (gateway) observed it; a late fill-in of a finished step (an earlier start, further
        progress), which keeps its ``update_time``, shows with the next change.
        """
        if not self._postgres:
            return None
        state = sa.select(workflows.c.state).where(workflows.c.workflow_id == workflow_id).scalar_subquery()
        query = sa.select(
            state,
            sa.func.count(),
            sa.func.sum(sa.extract("epoch", tasks.c.update_time)),
            sa.func.count().filter(tasks.c.cancel_requested),
        ).where(tasks.c.workflow_id == workflow_id)
        async with transaction(self._engine) as conn:
            row = (await conn.execute(query)).one()
        return tuple(row)

    async def steps(self, workflow_id: str) -> dict[str, TaskRecord]:
        """Every step's task record (with its cancel mark), by task id."""
        async with transaction(self._engine) as conn:
            rows = (await conn.execute(sa.select(tasks).where(tasks.c.workflow_id == workflow_id))).mappings()
            return {row["task_id"]: record_with_marks(row) for row in rows}

    async def active(self, limit: int) -> list[WorkflowRecord]:
        """Up to ``limit`` workflows not yet terminal, oldest first."""
        async with transaction(self._engine) as conn:
            query = (
                sa.select(workflows)
                .where(workflows.c.state.notin_(TERMINAL))
                .order_by(workflows.c.create_time)
                .limit(limit)
            )
            return [_record(row) for row in (await conn.execute(query)).mappings()]

    async def needing_attention(self, limit: int, since: dt.datetime | None = None) -> list[WorkflowRecord]:
        """Up to ``limit`` unfinished workflows, oldest first, that the loop has something to
        do for: a step ended FAILED or CANCELLED (its followers may have to be ended), a
        WAITING step's cancel was asked, or no step is left unfinished. ``since``: only
        those with a step changed at or after it (None: all).

        The test runs in the database, over the steps' rows; only the workflows it finds
        have their steps read (a pass over thousands of waiting steps reads none of them).
        """
        stopping = sa.exists().where(
            tasks.c.workflow_id == workflows.c.workflow_id,
            sa.or_(
                tasks.c.state.in_(_STOPPERS),
                sa.and_(tasks.c.state == TaskState.WAITING.value, tasks.c.cancel_requested),
            ),
        )
        unfinished = sa.exists().where(
            tasks.c.workflow_id == workflows.c.workflow_id, tasks.c.state.notin_(TERMINAL)
        )
        where = [workflows.c.state.notin_(TERMINAL), sa.or_(stopping, ~unfinished)]
        if since is not None:
            where.append(workflows.c.workflow_id.in_(_changed_since(since)))
        query = sa.select(workflows).where(*where).order_by(workflows.c.create_time).limit(limit)
        async with transaction(self._engine) as conn:
            return [_record(row) for row in (await conn.execute(query)).mappings()]

    async def cancel_stopped(self, errors: Mapping[str, TaskError], now: dt.datetime) -> int:
        """End steps that never ran CANCELLED, each with its error (naming the step that
        stopped it); returns how many changed.

        A step still WAITING, or FAILED by Celery on behalf of the earlier step that failed
        (it never ran: the use case tells them apart), is changed; any other is left alone.
        """
        changed = 0
        async with transaction(self._engine) as conn:
            for task_id, error in sorted(errors.items()):
                statement = (
                    tasks.update()
                    .where(tasks.c.task_id == task_id, tasks.c.state.in_(_STOPPABLE))
                    .values(
                        state=TaskState.CANCELLED.value,
                        error=vars_of(error),
                        end_time=now,
                        update_time=now,
                        publish_after=None,
                    )
                )
                changed += (await conn.execute(statement)).rowcount
        return changed

    async def finish(self, workflow_id: str, state: TaskState, now: dt.datetime) -> None:
        """Record the workflow's terminal state (once)."""
        async with transaction(self._engine) as conn:
            await conn.execute(
                workflows.update()
                .where(workflows.c.workflow_id == workflow_id, workflows.c.state.notin_(TERMINAL))
                .values(state=state.value, end_time=now)
            )
