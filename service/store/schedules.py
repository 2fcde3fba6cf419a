"""The schedules table: CRUD, and the firing round that claims due schedules and inserts
their tasks in one transaction.

Due rows are claimed with ``FOR UPDATE OF schedules SKIP LOCKED``: two gateways never
decide the same schedule at the same time, and the one that comes second finds it no
longer due (``next_run_time`` advanced in the same commit). The fired task's request_id
is derived from the schedule and the slot, and its insert is ``ON CONFLICT DO NOTHING``
on ``(caller, request_id)``: even a slot decided twice yields one task.

A slot may be decided ahead, up to a *lead* before it (``fire_due``'s ``horizon``): its task
is recorded then, due at the slot, and published at the slot by the replica that decided
it. Only a schedule with no other firing pending and no previous firing still running (or
under ALLOW) is decided ahead; the others are decided when due, as before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.domain.model import Delivery
from service.domain.schedule import OverlapPolicy, Plan, Schedule, ScheduleExists, TaskTemplate, Timing
from service.store.listing import transaction
from service.store.postgres import UNNEST_INSERT, columns, on_driver
from service.store.rows import INSERT_COLUMNS, NewTask, insert_row, insert_values
from service.store.tables import TERMINAL, JSONType, UTCDateTime, metadata, tasks

schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("schedule_id", sa.String(200), primary_key=True),
    sa.Column("caller", sa.String(255), nullable=False, server_default=""),
    sa.Column("spec", JSONType, nullable=False),
    sa.Column("template", JSONType, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("overlap_policy", sa.String(16), nullable=False),
    sa.Column("catchup_window", sa.Float, nullable=False),
    sa.Column("next_run_time", UTCDateTime, nullable=True),
    sa.Column("last_run_time", UTCDateTime, nullable=True),
    sa.Column("last_task_id", sa.String(64), nullable=True),
    sa.Column("skipped_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("anchor_time", UTCDateTime, nullable=False),
    sa.Column("create_time", UTCDateTime, nullable=False),
    sa.Column("update_time", UTCDateTime, nullable=False),
)

#: The fired tasks' INSERT on PostgreSQL: one ``unnest`` statement through the driver (no
#: statement compiled in Python per round); a slot already fired is left alone.
INSERT_FIRED = UNNEST_INSERT + " ON CONFLICT DO NOTHING RETURNING task_id"
#: The claimed schedules' advance on PostgreSQL: one ``unnest`` UPDATE through the driver.
ADVANCE = """
UPDATE schedules SET next_run_time = t.next, skipped_count = t.skipped, last_run_time = t.last_run,
    last_task_id = t.last_task
FROM unnest($1::varchar[], $2::timestamptz[], $3::bigint[], $4::timestamptz[], $5::varchar[])
    AS t(key, next, skipped, last_run, last_task)
WHERE schedules.schedule_id = t.key
"""
#: Due schedules decided between two yields to the event loop.
DECIDE_CHUNK = 100
#: Specs and templates remembered parsed, by their JSON text: a round of claimed schedules
#: parses only those it has not seen (a schedule's are the same every slot).
PARSED_CACHE = 32_768


@dataclass(frozen=True, slots=True)
class Firing:
    """What the use case decided for one due schedule: the plan, and the task to insert."""

    plan: Plan
    task: NewTask | None


_POLICIES = {policy.value: policy for policy in OverlapPolicy}

#: Decides a due schedule's round: ``(schedule, previous firing still running, now)``.
Decide = Callable[[Schedule, bool, dt.datetime], Firing]


def schedule_of(row: RowMapping) -> Schedule:
    """The schedule of a row."""
    return _schedule(row, Timing.from_json(dict(row["spec"])), TaskTemplate.from_json(dict(row["template"])))


def _schedule(row: RowMapping, timing: Timing, task: TaskTemplate) -> Schedule:
    return Schedule(
        schedule_id=row["schedule_id"],
        timing=timing,
        task=task,
        caller=row["caller"],
        paused=row["paused"],
        overlap_policy=_POLICIES[row["overlap_policy"]],
        catchup_window=dt.timedelta(seconds=row["catchup_window"]),
        next_run_time=row["next_run_time"],
        last_run_time=row["last_run_time"],
        last_task_id=row["last_task_id"] or "",
        skipped_count=row["skipped_count"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        anchor_time=row["anchor_time"],
    )


@functools.lru_cache(maxsize=PARSED_CACHE)
def _timing_of(text: str) -> Timing:
    return Timing.from_json(json.loads(text))


@functools.lru_cache(maxsize=PARSED_CACHE)
def _template_of(text: str) -> TaskTemplate:
    """The template of a ``template`` column's text (shared by equal texts: never mutated)."""
    return TaskTemplate.from_json(json.loads(text))


def _claimed_schedule(row: RowMapping) -> Schedule:
    """The schedule of a claimed row (spec and template as JSON text, parsed once per text)."""
    return _schedule(row, _timing_of(row["spec_text"]), _template_of(row["template_text"]))


def row_of(schedule: Schedule) -> dict[str, Any]:
    """A schedule as column values."""
    return {
        "schedule_id": schedule.schedule_id,
        "caller": schedule.caller,
        "spec": schedule.timing.to_json(),
        "template": schedule.task.to_json(),
        "paused": schedule.paused,
        "overlap_policy": schedule.overlap_policy.value,
        "catchup_window": schedule.catchup_window.total_seconds(),
        "next_run_time": schedule.next_run_time,
        "last_run_time": schedule.last_run_time,
        "last_task_id": schedule.last_task_id or None,
        "skipped_count": schedule.skipped_count,
        "anchor_time": schedule.anchor_time,
        "create_time": schedule.create_time,
        "update_time": schedule.update_time,
    }


class ScheduleStore:
    """Reads and writes schedules; fires due ones."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._insert = postgresql.insert if self._postgres else sqlite.insert

    async def create(self, schedule: Schedule) -> None:
        """Record a new schedule.

        Raises:
            ScheduleExists: the schedule_id is taken.
        """
        statement = self._insert(schedules).values(row_of(schedule)).on_conflict_do_nothing()
        async with transaction(self._engine) as conn:
            if (await conn.execute(statement)).rowcount == 0:
                raise ScheduleExists(
                    f"schedule_id {schedule.schedule_id!r} is taken; choose another, or UpdateSchedule it"
                )

    async def get(self, schedule_id: str) -> Schedule | None:
        """The schedule, or None."""
        async with transaction(self._engine) as conn:
            query = sa.select(schedules).where(schedules.c.schedule_id == schedule_id)
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else schedule_of(row)

    async def page(self, after: str, limit: int, caller: str | None) -> list[Schedule]:
        """Up to ``limit`` schedules in schedule_id order after ``after``; only ``caller``'s
        unless None."""
        query = sa.select(schedules).where(schedules.c.schedule_id > after)
        if caller is not None:
            query = query.where(schedules.c.caller == caller)
        query = query.order_by(schedules.c.schedule_id).limit(limit)
        async with transaction(self._engine) as conn:
            return [schedule_of(row) for row in (await conn.execute(query)).mappings()]

    async def update(
        self, schedule_id: str, change: Callable[[Schedule], Schedule | None]
    ) -> Schedule | None:
        """Read the schedule locked, apply ``change``, write the result back.

        ``change`` gets the current schedule and returns the new one (None: leave it); what
        it raises rolls everything back. Returns the schedule as written (None: no such
        schedule, or ``change`` declined).
        """
        async with transaction(self._engine) as conn:
            query = sa.select(schedules).where(schedules.c.schedule_id == schedule_id).with_for_update()
            row = (await conn.execute(query)).mappings().first()
            if row is None:
                return None
            new = change(schedule_of(row))
            if new is None:
                return None
            values = row_of(new)
            await conn.execute(
                schedules.update().where(schedules.c.schedule_id == schedule_id).values(values)
            )
        return new

    async def delete(self, schedule_id: str) -> Schedule | None:
        """Remove the schedule (its fired tasks stay); returns it as it was when deleted
        (with the slot a replica may have decided meanwhile), None when there was none."""
        async with transaction(self._engine) as conn:
            statement = schedules.delete().where(schedules.c.schedule_id == schedule_id).returning(schedules)
            row = (await conn.execute(statement)).mappings().first()
        return None if row is None else schedule_of(row)

    async def record_trigger(self, schedule_id: str, new: NewTask) -> bool:
        """Insert a manual firing's task and note it on the schedule, in one transaction.

        Returns:
            False when the schedule is gone (nothing is recorded).
        """
        # a slot decided ahead (``last_run_time`` still to come) stays the schedule's last
        # firing: a pause or delete must still find it to withdraw it
        ahead = schedules.c.last_run_time > new.create_time
        async with transaction(self._engine) as conn:
            changed = await conn.execute(
                schedules.update()
                .where(schedules.c.schedule_id == schedule_id)
                .values(
                    last_task_id=sa.case((ahead, schedules.c.last_task_id), else_=new.task_id),
                    last_run_time=sa.case((ahead, schedules.c.last_run_time), else_=new.create_time),
                )
            )
            if not changed.rowcount:
                return False
            await conn.execute(tasks.insert().values(insert_row(new)))
        return True

    async def fire_due(
        self, now: dt.datetime, limit: int, decide: Decide, horizon: dt.datetime | None = None
    ) -> tuple[int, list[Delivery]]:
        """Claim up to ``limit`` due schedules, decide each, insert the tasks that fire and
        advance the schedules, all in one transaction.

        Schedules due by ``horizon`` (after ``now``) are claimed too, when they may be
        decided ahead: no firing of theirs is still ahead of ``now`` (``last_run_time``), and
        their previous firing has finished or their policy is ALLOW.

        Returns:
            How many schedules were claimed, and the deliveries of the tasks inserted (to
            hand to the outbox at their ``run_time``; the relay publishes them anyway, a
            lease after it, if this process dies).
        """
        previous = tasks.alias("previous")
        due = schedules.c.next_run_time <= now
        if horizon is not None and horizon > now:
            ahead = sa.and_(
                schedules.c.next_run_time <= horizon,
                sa.or_(schedules.c.last_run_time.is_(None), schedules.c.last_run_time <= now),
                sa.or_(
                    schedules.c.overlap_policy == OverlapPolicy.ALLOW.value,
                    previous.c.task_id.is_(None),
                    previous.c.state.in_(TERMINAL),
                ),
            )
            due = sa.or_(due, ahead)
        # the due rows are claimed (sorted, locked) first; only the claimed ones' spec and
        # template are then rendered as text (parsed once per text), not every due row's
        claimed = (
            sa.select(*schedules.c, previous.c.state.label("previous_state"))
            .select_from(schedules.outerjoin(previous, previous.c.task_id == schedules.c.last_task_id))
            .where(sa.not_(schedules.c.paused), schedules.c.next_run_time.isnot(None), due)
            .order_by(schedules.c.next_run_time)
            .limit(limit)
            .with_for_update(skip_locked=True, of=schedules)
            .subquery("claimed")
        )
        parsed = ("spec", "template")
        query = sa.select(
            *(column for column in claimed.c if column.name not in parsed),
            *(sa.cast(claimed.c[name], sa.Text).label(f"{name}_text") for name in parsed),
        ).order_by(claimed.c.next_run_time)
        async with transaction(self._engine) as conn:
            rows = (await conn.execute(query)).mappings().all()
            if not rows:
                return 0, []
            firings = await _decide_all(rows, decide, now)
            news = [firing.task for _, firing in firings if firing.task is not None]
            inserted = await self._insert_tasks(conn, news)
            await self._advance(conn, firings, inserted)
        return len(rows), [new.delivery for new in news if new.task_id in inserted]

    async def due_counts(
        self, edge: dt.datetime, horizon: dt.datetime
    ) -> tuple[int, int, dt.datetime | None]:
        """What is waiting to be decided by ``horizon`` (unpaused): how many schedules are due
        by ``edge``, how many after it, and the earliest of those after it (None: none)."""
        slot = schedules.c.next_run_time
        later = sa.type_coerce(sa.func.min(sa.case((slot > edge, slot))), UTCDateTime)
        query = sa.select(
            sa.func.coalesce(sa.func.sum(sa.case((slot <= edge, 1), else_=0)), 0), sa.func.count(), later
        ).where(sa.not_(schedules.c.paused), slot.isnot(None), slot <= horizon)
        async with transaction(self._engine) as conn:
            urgent, total, earliest = (await conn.execute(query)).one()
        return int(urgent), int(total) - int(urgent), earliest

    async def release(self, task_ids: Sequence[str]) -> None:
        """Leave decided-ahead tasks to the outbox relay at their run time (this process will
        not publish them: it is stopping); those published already are left alone."""
        if not task_ids:
            return
        async with transaction(self._engine) as conn:
            await conn.execute(
                tasks.update()
                .where(
                    tasks.c.task_id.in_(sorted(task_ids)),
                    tasks.c.publish_after.isnot(None),
                    tasks.c.publish_time.is_(None),
                )
                .values(publish_after=tasks.c.run_time)
            )

    async def _insert_tasks(self, conn: AsyncConnection, news: Sequence[NewTask]) -> set[str]:
        """Insert the fired tasks; a slot already fired (same request_id) is left alone."""
        if not news:
            return set()
        if self._postgres:
            arrays = columns((insert_values(new) for new in news), len(INSERT_COLUMNS))
            found = await on_driver(conn, INSERT_FIRED, lambda driver: driver.fetch(INSERT_FIRED, *arrays))
            return {row["task_id"] for row in found}
        statement = (
            self._insert(tasks)
            .values([insert_row(new) for new in news])
            .on_conflict_do_nothing()
            .returning(tasks.c.task_id)
        )
        return set((await conn.execute(statement)).scalars())

    async def _advance(
        self,
        conn: AsyncConnection,
        firings: Sequence[tuple[RowMapping, Firing]],
        inserted: set[str],
    ) -> None:
        """Write each claimed schedule's next slot, skipped count and last firing."""
        values = []  # (key, next slot, skipped count, last run, last task)
        for row, firing in firings:
            task, decided = firing.task, firing.plan
            fired = task is not None and task.task_id in inserted
            values.append(
                (
                    row["schedule_id"],
                    decided.next_run_time,
                    row["skipped_count"] + decided.skipped,
                    decided.fire if fired else row["last_run_time"],
                    task.task_id if fired and task is not None else row["last_task_id"],
                )
            )
        if self._postgres:
            arrays = columns(values, 5)
            await on_driver(conn, ADVANCE, lambda driver: driver.execute(ADVANCE, *arrays))
            return
        statement = (
            schedules.update()
            .where(schedules.c.schedule_id == sa.bindparam("b_key"))
            .values(
                next_run_time=sa.bindparam("b_next", type_=UTCDateTime),
                skipped_count=sa.bindparam("b_skipped"),
                last_run_time=sa.bindparam("b_last_run", type_=UTCDateTime),
                last_task_id=sa.bindparam("b_last_task"),
            )
        )
        names = ("b_key", "b_next", "b_skipped", "b_last_run", "b_last_task")
        await conn.execute(statement, [dict(zip(names, value, strict=True)) for value in values])


async def _decide_all(
    rows: Sequence[RowMapping], decide: Decide, now: dt.datetime
) -> list[tuple[RowMapping, Firing]]:
    """Decide every claimed row, yielding to the event loop every ``DECIDE_CHUNK`` rows."""
    firings: list[tuple[RowMapping, Firing]] = []
    for start in range(0, len(rows), DECIDE_CHUNK):
        if start:
            await asyncio.sleep(0)
        chunk = rows[start : start + DECIDE_CHUNK]
        firings.extend(
            (row, decide(_claimed_schedule(row), _running(row["previous_state"]), now)) for row in chunk
        )
    return firings


def _running(state: str | None) -> bool:
    """The previous firing's state says it has not finished (None: no previous firing)."""
    return state is not None and state not in TERMINAL
