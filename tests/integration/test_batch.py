"""EnqueueBatch: many tasks in one call, all or nothing, through a real worker."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from service.app import Runtime
from service.store.tasks import COPY_FROM, tasks
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, kwargs, value, wait_state


def add(x: Any, y: Any, **options: Any) -> pb.BatchTask:
    return pb.BatchTask(task_name="demo.add", args=args(x, y), **options)


def in_seconds(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds))
    return stamp


async def rows_with_request_ids(runtime: Runtime, prefix: str) -> int:
    async with runtime.store.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(tasks).where(tasks.c.request_id.like(f"{prefix}%"))
        return int(await conn.scalar(query) or 0)


def bad_request(error: aio.AioRpcError) -> list[tuple[str, str]]:
    raw = [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]
    assert len(raw) == 1 and isinstance(raw[0], bytes)
    status = status_pb2.Status.FromString(raw[0])
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return [(v.field, v.description) for v in detail.field_violations]


async def test_every_task_runs_with_its_own_arguments(stub: pb_grpc.TaskServiceStub) -> None:
    batch = [add(i, 1000) for i in range(20)]
    batch.append(pb.BatchTask(task_name="demo.add", args=args(1.5), kwargs=kwargs(y=2)))
    response = await stub.EnqueueBatch(pb.EnqueueBatchRequest(tasks=batch))
    assert len(response.tasks) == 21 and not response.deduplicated
    assert len({t.task_id for t in response.tasks}) == 21
    assert all(t.state == pb.TASK_STATE_QUEUED for t in response.tasks)
    for i, accepted in enumerate(response.tasks[:20]):
        task = await wait_state(stub, accepted.task_id)
        assert task.state == pb.TASK_STATE_SUCCEEDED
        assert value(task.result) == i + 1000
    last = await wait_state(stub, response.tasks[20].task_id)
    assert value(last.result) == 3.5


async def test_each_task_has_its_own_schedule(stub: pb_grpc.TaskServiceStub) -> None:
    countdown = duration_pb2.Duration(seconds=3600)
    batch = [add(1, 2), add(1, 2, run_time=in_seconds(7200)), add(1, 2, countdown=countdown)]
    response = await stub.EnqueueBatch(pb.EnqueueBatchRequest(tasks=batch))
    states = [t.state for t in response.tasks]
    assert states == [pb.TASK_STATE_QUEUED, pb.TASK_STATE_SCHEDULED, pb.TASK_STATE_SCHEDULED]
    held = await stub.GetStatus(pb.GetStatusRequest(task_id=response.tasks[1].task_id))
    assert held.task.run_time.ToDatetime(dt.UTC) > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=7000)
    assert (await wait_state(stub, response.tasks[0].task_id)).state == pb.TASK_STATE_SUCCEEDED


async def test_one_bad_task_refuses_the_whole_batch_and_names_every_bad_one(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime
) -> None:
    request_id = f"bad-{uuid.uuid4()}"
    batch = [add(i, i) for i in range(10)]
    batch[3] = pb.BatchTask(task_name="demo.nope")
    batch[7] = pb.BatchTask(task_name="demo.add", args=args(1, 2, 3))
    batch[8] = add(1, 2, priority=11)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.EnqueueBatch(pb.EnqueueBatchRequest(tasks=batch, request_id=request_id))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("tasks[3]: task_name 'demo.nope' is not in this gateway's catalog")
    assert "2 more invalid tasks" in details
    violations = bad_request(error)
    assert [field for field, _ in violations] == ["tasks[3]", "tasks[7]", "tasks[8]"]
    assert "do not fit demo.add" in violations[1][1]
    assert "priority must be between 0 and 9" in violations[2][1]
    assert await rows_with_request_ids(runtime, request_id) == 0


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (pb.EnqueueBatchRequest(), "tasks is empty"),
        (pb.EnqueueBatchRequest(tasks=[add(1, 2)] * 1001), "the limit is 1000 (TASKGATE_MAX_BATCH)"),
        (pb.EnqueueBatchRequest(tasks=[add(1, 2)], request_id="x" * 241), "longer than 240"),
    ],
    ids=["empty", "too-many", "long-request-id"],
)
async def test_batch_limits(
    stub: pb_grpc.TaskServiceStub, request_: pb.EnqueueBatchRequest, expected: str
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.EnqueueBatch(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (caught.value.details() or "")


async def test_a_repeated_batch_is_deduplicated_and_a_changed_one_conflicts(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime
) -> None:
    request_id = f"fanout-{uuid.uuid4()}"
    request = pb.EnqueueBatchRequest(tasks=[add(i, 1) for i in range(5)], request_id=request_id)
    first = await stub.EnqueueBatch(request)
    again = await stub.EnqueueBatch(request)
    assert again.deduplicated and not first.deduplicated
    assert [t.task_id for t in again.tasks] == [t.task_id for t in first.tasks]
    assert await rows_with_request_ids(runtime, request_id) == 5
    status = await stub.GetStatus(pb.GetStatusRequest(task_id=first.tasks[2].task_id))
    assert status.task.request_id == f"{request_id}#2"

    changed = pb.EnqueueBatchRequest(tasks=[add(i, 2) for i in range(5)], request_id=request_id)
    longer = pb.EnqueueBatchRequest(tasks=[add(i, 1) for i in range(6)], request_id=request_id)
    for conflicting in (changed, longer):
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.EnqueueBatch(conflicting)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "different batch" in (caught.value.details() or "")
    assert await rows_with_request_ids(runtime, request_id) == 5
    for accepted in first.tasks:
        assert (await wait_state(stub, accepted.task_id)).state == pb.TASK_STATE_SUCCEEDED


async def test_a_large_batch_is_recorded_and_published_once(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime
) -> None:
    request_id = f"large-{uuid.uuid4()}"
    batch = [add(i, 0, run_time=in_seconds(3600)) for i in range(1000)]
    response = await stub.EnqueueBatch(pb.EnqueueBatchRequest(tasks=batch, request_id=request_id))
    assert len(response.tasks) == 1000
    async with runtime.store.engine.connect() as conn:
        query = sa.select(tasks.c.task_id, tasks.c.request_id).where(
            tasks.c.request_id.like(f"{request_id}#%")
        )
        rows = {row[0]: row[1] for row in await conn.execute(query)}
    assert len(rows) == 1000
    assert [rows[t.task_id] for t in response.tasks] == [f"{request_id}#{i}" for i in range(1000)]


async def test_a_batch_over_the_copy_threshold_runs_with_its_arguments(stub: pb_grpc.TaskServiceStub) -> None:
    count = COPY_FROM + 16  # recorded with COPY instead of INSERT … unnest
    batch = [pb.BatchTask(task_name="demo.add", args=args(i), kwargs=kwargs(y=0.5)) for i in range(count)]
    response = await stub.EnqueueBatch(pb.EnqueueBatchRequest(tasks=batch))
    for i in (0, count // 2, count - 1):
        task = await wait_state(stub, response.tasks[i].task_id)
        assert task.state == pb.TASK_STATE_SUCCEEDED
        assert value(task.result) == i + 0.5
