"""Enqueue and EnqueueAt, end to end through a real worker."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import grpc
import pytest
import redis
import sqlalchemy as sa
from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio

from service.app import Runtime
from service.store.tasks import tasks
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, enqueue, kwargs, value, wait_state


def ts(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def count_rows(runtime: Runtime) -> int:
    async with runtime.store.engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(tasks)) or 0)


async def test_add_runs_and_returns_an_int(stub: pb_grpc.TaskServiceStub) -> None:
    response = await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(2, 3)))
    assert response.state == pb.TASK_STATE_QUEUED
    assert not response.deduplicated
    task = await wait_state(stub, response.task_id)
    assert task.state == pb.TASK_STATE_SUCCEEDED
    assert value(task.result) == 5
    assert task.task_name == "demo.add"
    assert task.HasField("start_time") and task.HasField("end_time")
    assert task.create_time.ToDatetime() <= task.start_time.ToDatetime() <= task.end_time.ToDatetime()


async def test_kwargs_and_queue_are_passed(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = await enqueue(stub, "demo.add", 1.5, y=2)
    task = await wait_state(stub, task_id)
    assert value(task.result) == 3.5


async def test_failure_is_reported_with_type_message_and_traceback(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = await enqueue(stub, "demo.fail", "disk on fire")
    task = await wait_state(stub, task_id)
    assert task.state == pb.TASK_STATE_FAILED
    assert task.error.type == "DemoError"
    assert "disk on fire" in task.error.message
    assert "Traceback" in task.error.traceback
    assert not task.HasField("result")


@pytest.mark.parametrize(
    ("task_name", "arguments", "named", "needle"),
    [
        ("demo.nope", [], {}, "demo.nope"),
        ("celery.backend_cleanup", [], {}, "celery.backend_cleanup"),
        ("demo.add", [1], {}, "missing a required argument: 'y'"),
        ("demo.add", [1, 2, 3], {}, "too many positional arguments"),
        ("demo.add", [1, 2], {"z": 3}, "unexpected keyword argument 'z'"),
        ("", [], {}, "task_name is required"),
    ],
)
async def test_bad_requests_are_refused_and_nothing_is_recorded(
    stub: pb_grpc.TaskServiceStub,
    runtime: Runtime,
    task_name: str,
    arguments: list[object],
    named: dict[str, object],
    needle: str,
) -> None:
    before = await count_rows(runtime)
    request = pb.EnqueueRequest(task_name=task_name, args=args(*arguments), kwargs=kwargs(**named))
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Enqueue(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (caught.value.details() or "")
    assert await count_rows(runtime) == before


async def test_request_id_deduplicates_and_conflicts(
    stub: pb_grpc.TaskServiceStub, redis_client: redis.Redis, runtime: Runtime
) -> None:
    tag = f"dedup-{dt.datetime.now().timestamp()}"
    request = pb.EnqueueRequest(task_name="demo.record", args=args(tag), request_id=tag)
    first = await stub.Enqueue(request)
    second = await stub.Enqueue(request)
    assert second.task_id == first.task_id
    assert second.deduplicated and not first.deduplicated
    await wait_state(stub, first.task_id)
    third = await stub.Enqueue(request)
    assert third.task_id == first.task_id
    assert third.state == pb.TASK_STATE_SUCCEEDED

    different = pb.EnqueueRequest(task_name="demo.record", args=args("other"), request_id=tag)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Enqueue(different)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert tag in (caught.value.details() or "")

    runs = redis_client.lrange(f"{runtime.settings.key_prefix}taskgate-demo-runs", 0, -1)
    assert sum(1 for run in runs if run.decode().startswith(f"{tag}|")) == 1


async def test_countdown_schedules(stub: pb_grpc.TaskServiceStub) -> None:
    request = pb.EnqueueRequest(
        task_name="demo.add", args=args(1, 1), countdown=duration_pb2.Duration(seconds=2)
    )
    response = await stub.Enqueue(request)
    assert response.state == pb.TASK_STATE_SCHEDULED
    task = await wait_state(stub, response.task_id)
    assert task.state == pb.TASK_STATE_SUCCEEDED
    assert task.start_time.ToDatetime() >= task.run_time.ToDatetime()


async def test_enqueue_at_is_scheduled_until_run_time(stub: pb_grpc.TaskServiceStub) -> None:
    run_time = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    response = await stub.EnqueueAt(
        pb.EnqueueAtRequest(task_name="demo.add", args=args(2, 2), run_time=ts(run_time))
    )
    assert response.state == pb.TASK_STATE_SCHEDULED
    status = await stub.GetStatus(pb.GetStatusRequest(task_id=response.task_id))
    assert status.task.state == pb.TASK_STATE_SCHEDULED
    task = await wait_state(stub, response.task_id)
    assert value(task.result) == 4
    assert task.start_time.ToDatetime(tzinfo=dt.UTC) >= run_time


async def test_enqueue_at_in_the_past_runs_at_once(stub: pb_grpc.TaskServiceStub) -> None:
    run_time = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    response = await stub.EnqueueAt(
        pb.EnqueueAtRequest(task_name="demo.add", args=args(1, 2), run_time=ts(run_time))
    )
    assert response.state == pb.TASK_STATE_QUEUED
    assert value((await wait_state(stub, response.task_id)).result) == 3


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.EnqueueAtRequest(task_name="demo.add", args=args(1, 2)), "run_time is required"),
        (
            pb.EnqueueAtRequest(
                task_name="demo.add",
                args=args(1, 2),
                run_time=ts(dt.datetime.now(dt.UTC) + dt.timedelta(days=400)),
            ),
            "365 days",
        ),
    ],
)
async def test_enqueue_at_refuses_missing_or_too_distant_run_time(
    stub: pb_grpc.TaskServiceStub, request_: pb.EnqueueAtRequest, needle: str
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.EnqueueAt(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (caught.value.details() or "")


async def test_a_published_task_loses_its_mark(runtime: Runtime, stub: pb_grpc.TaskServiceStub) -> None:
    # the fast path marks published rows in one statement every 0.1 s (store.mark_published)
    task_ids = [await enqueue(stub, "demo.add", n, 1) for n in range(3)]
    query = sa.select(tasks.c.task_id, tasks.c.publish_after, tasks.c.publish_time).where(
        tasks.c.task_id.in_(task_ids)
    )
    deadline = time.monotonic() + 10
    while True:
        async with runtime.store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if all(row.publish_after is None and row.publish_time is not None for row in rows):
            break
        assert time.monotonic() < deadline, f"still marked for publishing: {rows}"
        await asyncio.sleep(0.05)
    assert len(rows) == 3
