"""GetStatus and StreamProgress: snapshots, live changes, records that outlive Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time

import grpc
import pytest
import redis
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.domain import TaskState, TaskUpdate
from service.progress import CLIENT_NAME
from service.server import Runtime
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import enqueue, value, wait_state


async def collect(stub: pb_grpc.TaskServiceStub, task_id: str) -> list[pb.Task]:
    return [m.task async for m in stub.StreamProgress(pb.StreamProgressRequest(task_id=task_id), timeout=60)]


async def test_unknown_ids_are_not_found(stub: pb_grpc.TaskServiceStub) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetStatus(pb.GetStatusRequest(task_id="no-such-task"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-task" in (caught.value.details() or "")
    with pytest.raises(aio.AioRpcError) as caught:
        await collect(stub, "no-such-task")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_empty_id_is_invalid(stub: pb_grpc.TaskServiceStub) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetStatus(pb.GetStatusRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_sends_snapshot_then_every_step_then_ends(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = await enqueue(stub, "demo.progress", 5, interval=0.2)
    messages = await collect(stub, task_id)
    assert messages[0].state in (pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING)
    currents = [m.progress.current for m in messages if m.HasField("progress")]
    assert currents == sorted(currents)
    assert {1, 2, 3, 4, 5} <= set(currents)
    assert messages[-1].state == pb.TASK_STATE_SUCCEEDED
    assert value(messages[-1].result) == 5
    assert messages[-1].progress.total == 5
    assert messages[-1].progress.message == "step 5 of 5"
    assert all(m.state != pb.TASK_STATE_SUCCEEDED for m in messages[:-1])


async def test_stream_of_a_finished_task_is_one_message(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = await enqueue(stub, "demo.add", 1, 1)
    await wait_state(stub, task_id)
    messages = await collect(stub, task_id)
    assert len(messages) == 1
    assert messages[0].state == pb.TASK_STATE_SUCCEEDED


async def test_stream_ends_on_failure(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = await enqueue(stub, "demo.fail", "nope")
    messages = await collect(stub, task_id)
    assert messages[-1].state == pb.TASK_STATE_FAILED
    assert "nope" in messages[-1].error.message


async def wait_recorded(runtime: Runtime, task_id: str, timeout: float = 30) -> TaskState:
    deadline = time.monotonic() + timeout
    while True:
        record = await runtime.store.get(task_id)
        assert record is not None
        if record.state.terminal or time.monotonic() > deadline:
            return record.state
        await asyncio.sleep(0.1)


async def test_unwatched_task_is_recorded_and_outlives_its_redis_key(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime, redis_client: redis.Redis
) -> None:
    task_id = await enqueue(stub, "demo.add", 20, 22)
    # nobody reads it through the API: the recorder alone must write the result
    assert await wait_recorded(runtime, task_id) is TaskState.SUCCEEDED
    key = f"{runtime.settings.task_meta_prefix}{task_id}"
    assert redis_client.delete(key) == 1
    task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
    assert task.state == pb.TASK_STATE_SUCCEEDED
    assert value(task.result) == 42
    assert [m.state for m in await collect(stub, task_id)] == [pb.TASK_STATE_SUCCEEDED]


async def test_terminal_state_is_never_overwritten(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime, redis_client: redis.Redis
) -> None:
    task_id = await enqueue(stub, "demo.add", 1, 2)
    assert await wait_recorded(runtime, task_id) is TaskState.SUCCEEDED
    key = f"{runtime.settings.task_meta_prefix}{task_id}"
    forged = json.dumps({"status": "STARTED", "result": {"pid": 1}, "task_id": task_id})
    redis_client.set(key, forged)
    redis_client.publish(key, forged)
    await runtime.recorder.flush()
    late = TaskUpdate(task_id=task_id, state=TaskState.RUNNING, observed_time=dt.datetime.now(dt.UTC))
    assert await runtime.store.apply_updates([late]) == 0
    record = await runtime.store.get(task_id)
    assert record is not None and record.state is TaskState.SUCCEEDED and record.result == 3
    task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
    assert task.state == pb.TASK_STATE_SUCCEEDED


def hub_connections(redis_client: redis.Redis) -> list[dict[str, object]]:
    mine = f"{CLIENT_NAME}-{os.getpid()}-"
    return [c for c in redis_client.client_list() if str(c.get("name", "")).startswith(mine)]


async def test_streams_share_one_subscription_and_release_on_cancel(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime, redis_client: redis.Redis
) -> None:
    task_ids = [await enqueue(stub, "demo.sleep", 3) for _ in range(5)]
    calls = [stub.StreamProgress(pb.StreamProgressRequest(task_id=t)) for t in task_ids for _ in range(40)]
    for call in calls:
        await call.read()  # the snapshot: every stream is registered
    assert runtime.hub.watcher_count >= len(calls)
    connections = hub_connections(redis_client)
    assert len(connections) <= 5  # one subscription plus a small read pool, whatever the stream count
    assert sum(1 for c in connections if str(c["name"]).endswith("-sub")) == 1
    for call in calls:
        call.cancel()
    deadline = time.monotonic() + 10
    while runtime.hub.watcher_count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert runtime.hub.watcher_count == 0


async def test_stream_survives_a_lost_subscription(
    stub: pb_grpc.TaskServiceStub, redis_client: redis.Redis
) -> None:
    task_id = await enqueue(stub, "demo.progress", 8, interval=0.25)
    call = stub.StreamProgress(pb.StreamProgressRequest(task_id=task_id), timeout=60)
    seen = [(await call.read()).task]
    (subscription,) = [c for c in hub_connections(redis_client) if str(c["name"]).endswith("-sub")]
    redis_client.client_kill_filter(_id=subscription["id"])
    while (message := await call.read()) is not aio.EOF:
        assert isinstance(message, pb.StreamProgressResponse)
        seen.append(message.task)
    assert seen[-1].state == pb.TASK_STATE_SUCCEEDED
    assert value(seen[-1].result) == 8


async def test_health_is_serving(channel: aio.Channel, runtime: Runtime) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 10
    while True:
        response = await health.Check(health_pb2.HealthCheckRequest(service="taskgate.v1.TaskService"))
        if response.status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
