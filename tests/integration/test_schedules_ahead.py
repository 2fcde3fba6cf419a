"""Deciding a slot ahead: the task is recorded before its slot (QUEUED, run_time = the slot)
and held; at most one slot per schedule is pending; without a canceller a pause and resume
inside the lead keeps the decided slot and resumes after it; with one (as the gateway wires
it) a pause or a delete inside the lead withdraws the decided firing, which never runs (a
manual trigger in between does not hide it); a
stopping gateway leaves held tasks to the relay at their slot."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import sqlalchemy as sa

from service.app import Runtime
from service.domain.model import TaskState
from service.domain.schedule import Schedule, TaskTemplate
from service.store.schedules import ScheduleStore
from service.store.tables import tasks
from service.usecases.schedules import Draft, Schedules

INTERVAL = dt.timedelta(seconds=30)


async def test_a_slot_is_decided_ahead_held_and_released(runtime: Runtime) -> None:
    engine = runtime.store.engine
    schedules = Schedules(
        ScheduleStore(engine), runtime.catalog, runtime.outbox, lead=dt.timedelta(seconds=60)
    )
    schedule_id = f"ahead-{uuid.uuid4().hex[:8]}"
    created = await schedules.create(
        Draft(schedule_id, interval=INTERVAL, task=TaskTemplate("demo.add", args=[1, 2]))
    )
    slot = created.next_run_time
    assert slot is not None
    try:
        got = await _decide(schedules, schedule_id)
        assert got.last_run_time == slot
        assert got.next_run_time == slot + INTERVAL
        # held by these rounds or by the session gateway's loop, whichever claimed it
        holder = schedules if schedules.held else runtime.schedules
        assert holder is not None and holder.held >= 1
        query = sa.select(tasks).where(tasks.c.task_id == got.last_task_id)
        async with engine.connect() as conn:
            row = (await conn.execute(query)).mappings().one()
        assert row["state"] == "QUEUED"
        assert row["run_time"] == slot
        assert row["create_time"] < slot
        assert row["publish_time"] is None

        await schedules.step()  # the following slot is due within the lead too: not decided yet
        again = await schedules.get(schedule_id)
        assert (again.next_run_time, again.last_task_id) == (slot + INTERVAL, got.last_task_id)

        await schedules.set_paused(schedule_id, True)
        resumed = await schedules.set_paused(schedule_id, False)
        assert resumed.next_run_time is not None and resumed.next_run_time > slot, "the decided slot stands"

        await holder.release()
        assert holder.held == 0
        async with engine.connect() as conn:
            row = (await conn.execute(query)).mappings().one()
        assert row["publish_after"] == slot, "the relay publishes it at its slot"
    finally:
        await schedules.release()
        await schedules.delete(schedule_id)


async def _decide(schedules: Schedules, schedule_id: str) -> Schedule:
    """Run firing rounds until the schedule's next slot is decided (by these rounds or the
    session gateway's own loop: rounds are paced, and claim the earliest schedules first)."""
    for _ in range(200):
        got = await schedules.get(schedule_id)
        if got.last_run_time is not None:
            return got
        await schedules.step()
        await asyncio.sleep(0.05)
    raise AssertionError(f"schedule {schedule_id} never decided")


async def _row(runtime: Runtime, task_id: str) -> sa.RowMapping:
    async with runtime.store.engine.connect() as conn:
        return (await conn.execute(sa.select(tasks).where(tasks.c.task_id == task_id))).mappings().one()


async def test_a_pause_or_delete_inside_the_lead_withdraws_the_decided_slot(runtime: Runtime) -> None:
    schedules = Schedules(
        ScheduleStore(runtime.store.engine),
        runtime.catalog,
        runtime.outbox,
        lead=dt.timedelta(seconds=60),
        control=runtime.gateway.control,
    )
    interval = dt.timedelta(seconds=20)  # the slot: 20 s after create, decided well before
    try:
        for action in ("pause", "delete"):
            schedule_id = f"withdraw-{action}-{uuid.uuid4().hex[:8]}"
            await schedules.create(
                Draft(schedule_id, interval=interval, task=TaskTemplate("demo.add", args=[1, 2]))
            )
            decided = await _decide(schedules, schedule_id)
            slot = decided.last_run_time
            assert slot is not None and slot > dt.datetime.now(dt.UTC), "decided ahead of its slot"
            if action == "pause":
                triggered = await schedules.trigger(schedule_id)  # a manual firing meanwhile
                assert (await schedules.get(schedule_id)).last_task_id == decided.last_task_id != triggered
                await schedules.set_paused(schedule_id, True)
            else:
                await schedules.delete(schedule_id)
            row = await _row(runtime, decided.last_task_id)
            assert row["state"] == TaskState.CANCELLED.value and row["cancel_requested"]
            # the hold still hands it to the outbox at its slot: the cancel mark stops the worker
            while dt.datetime.now(dt.UTC) < slot + dt.timedelta(seconds=3):
                await asyncio.sleep(0.2)
            row = await _row(runtime, decided.last_task_id)
            assert row["state"] == TaskState.CANCELLED.value
            seen = await runtime.hub.snapshot(decided.last_task_id)
            assert seen is None or seen.state is not TaskState.SUCCEEDED, "a withdrawn firing never runs"
            if action == "pause":
                await schedules.delete(schedule_id)
    finally:
        await schedules.release()
