"""Schedules firing on real gateway processes: each slot once from two replicas, SKIP while
the previous firing runs, pause and resume, catch-up after every gateway was stopped.

The test process's own firing loop is stopped for this module: the gateway processes
started here are the only replicas, so "all gateways stopped" means it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from grpc import aio

from service.app import Runtime
from service.config import Settings
from taskgate.v1 import schedule_service_pb2 as spb
from taskgate.v1 import schedule_service_pb2_grpc as spb_grpc
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, fired, slot_ms, wait_state
from tests.processes import GatewayProcess, start_gateway

POLL = {"TASKGATE_SCHEDULE_POLL_INTERVAL": "0.2"}


@pytest.fixture(scope="module")
async def no_local_firing(runtime: Runtime) -> AsyncIterator[None]:
    """Stop the test process's firing loop for this module, restart it afterwards."""
    assert runtime.schedules is not None
    loop = runtime.loops.task("schedules")
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    yield
    runtime.loops.start(f"schedules-{uuid.uuid4().hex[:6]}", runtime.schedules.step)


@pytest.fixture
async def gateway(settings: Settings, no_local_firing: None) -> AsyncIterator[GatewayProcess]:
    process = await start_gateway(settings, **POLL)
    yield process
    await process.stop()


def interval_schedule(
    schedule_id: str, seconds: float, task: str = "demo.add", *values: object
) -> spb.Schedule:
    schedule = spb.Schedule(schedule_id=schedule_id, task=pb.TaskTemplate(task_name=task, args=args(*values)))
    schedule.interval.FromTimedelta(dt.timedelta(seconds=seconds))
    return schedule


async def test_two_replicas_fire_each_slot_once(
    settings: Settings, stub: pb_grpc.TaskServiceStub, no_local_firing: None
) -> None:
    first = await start_gateway(settings, **POLL)
    second = await start_gateway(settings, **POLL)
    schedule_id = f"dup-{uuid.uuid4().hex[:8]}"
    try:
        async with aio.insecure_channel(first.target) as a, aio.insecure_channel(second.target) as b:
            stub_a, stub_b = spb_grpc.ScheduleServiceStub(a), spb_grpc.ScheduleServiceStub(b)
            schedule = interval_schedule(schedule_id, 1, "demo.add", 1, 2)
            schedule.overlap_policy = spb.OVERLAP_POLICY_ALLOW
            await stub_a.CreateSchedule(spb.CreateScheduleRequest(schedule=schedule))
            await asyncio.sleep(10)
            await stub_b.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))
    finally:
        await first.stop()
        await second.stop()
    tasks = await fired(stub, schedule_id)
    slots = [slot_ms(task) for task in tasks]
    assert len(tasks) >= 5
    assert len(set(slots)) == len(slots), "a slot fired twice"
    assert slots == sorted(slots)
    assert all(later - earlier == 1000 for earlier, later in itertools.pairwise(slots)), slots
    states = [(await wait_state(stub, task.task_id)).state for task in tasks]
    # the delete withdraws the one slot a replica may have decided ahead: that firing, the
    # last, ends CANCELLED and never runs; every earlier one ran
    if states[-1] == pb.TASK_STATE_CANCELLED:
        states.pop()
    assert states == [pb.TASK_STATE_SUCCEEDED] * len(states)


async def test_skip_while_the_previous_firing_runs(
    gateway: GatewayProcess, stub: pb_grpc.TaskServiceStub
) -> None:
    schedule_id = f"skip-{uuid.uuid4().hex[:8]}"
    async with aio.insecure_channel(gateway.target) as channel:
        schedules = spb_grpc.ScheduleServiceStub(channel)
        schedule = interval_schedule(schedule_id, 1, "demo.sleep", 3)
        await schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=schedule))
        await asyncio.sleep(6)
        await schedules.UpdateSchedule(
            spb.UpdateScheduleRequest(
                schedule=spb.Schedule(schedule_id=schedule_id, paused=True), update_mask={"paths": ["paused"]}
            )
        )
        got = (await schedules.GetSchedule(spb.GetScheduleRequest(schedule_id=schedule_id))).schedule
        await schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))
    tasks = await fired(stub, schedule_id)
    assert got.skipped_count >= 2
    assert 1 <= len(tasks) <= 3
    finished = [await wait_state(stub, task.task_id, timeout=30) for task in tasks]
    for earlier, later in itertools.pairwise(finished):
        # the next slot fired only once the previous firing had finished
        assert earlier.end_time.ToDatetime() <= later.create_time.ToDatetime()


async def test_pause_and_resume(gateway: GatewayProcess, stub: pb_grpc.TaskServiceStub) -> None:
    schedule_id = f"pause-{uuid.uuid4().hex[:8]}"
    async with aio.insecure_channel(gateway.target) as channel:
        schedules = spb_grpc.ScheduleServiceStub(channel)
        schedule = interval_schedule(schedule_id, 1, "demo.add", 1, 1)
        schedule.paused = True
        await schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=schedule))
        await asyncio.sleep(3)
        assert await fired(stub, schedule_id) == []
        resume = spb.UpdateScheduleRequest(
            schedule=spb.Schedule(schedule_id=schedule_id, paused=False), update_mask={"paths": ["paused"]}
        )
        resumed = (await schedules.UpdateSchedule(resume)).schedule
        assert resumed.HasField("next_run_time")
        deadline = time.monotonic() + 15
        while not await fired(stub, schedule_id):
            assert time.monotonic() < deadline, "no firing after resume"
            await asyncio.sleep(0.2)
        await schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))


async def test_catch_up_after_every_gateway_stopped_fires_once(
    settings: Settings, stub: pb_grpc.TaskServiceStub, no_local_firing: None
) -> None:
    schedule_id = f"catch-{uuid.uuid4().hex[:8]}"
    request = spb.GetScheduleRequest(schedule_id=schedule_id)
    first = await start_gateway(settings, **POLL)
    async with aio.insecure_channel(first.target) as channel:
        schedules = spb_grpc.ScheduleServiceStub(channel)
        schedule = interval_schedule(schedule_id, 3, "demo.add", 2, 2)
        await schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=schedule))
        while not (await schedules.GetSchedule(request)).schedule.last_task_id:
            await asyncio.sleep(0.1)
    await first.stop()
    before = await fired(stub, schedule_id)
    await asyncio.sleep(10)  # at least three slots pass with no gateway running
    second = await start_gateway(settings, **POLL)
    try:
        async with aio.insecure_channel(second.target) as channel:
            schedules = spb_grpc.ScheduleServiceStub(channel)
            while (got := (await schedules.GetSchedule(request)).schedule).last_task_id == before[-1].task_id:
                await asyncio.sleep(0.05)
            after = await fired(stub, schedule_id)
            await schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))
    finally:
        await second.stop()
    assert len(after) == len(before) + 1, "the missed slots fired more than once"
    assert got.skipped_count >= 2
    assert slot_ms(after[-1]) - slot_ms(before[-1]) >= 9000  # the latest missed slot, not the first
