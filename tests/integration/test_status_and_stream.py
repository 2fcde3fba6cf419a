"""GetStatus and StreamProgress: snapshots, live changes, records that outlive Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import Runtime
from service.domain.model import TaskState, TaskUpdate
from service.results.hub import CLIENT_NAME
from service.results.recorder import RECONCILE_CHUNK
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, enqueue, value, wait_state


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


def _local_ports_to(port: int) -> set[int]:
    """Local ports of this process's established TCP connections to ``port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and int(fields[9]) in inodes and remote_port == port:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def process_redis_connections(redis_client: redis.Redis) -> dict[str, str]:
    """This process's Redis connections but the test's own client: CLIENT LIST id -> name.

    Matched by address (the local ports of this process's sockets), so unnamed connections
    (kombu's, say) are found too.
    """
    ports = _local_ports_to(int(redis_client.connection_pool.connection_kwargs.get("port", 6379)))
    own = str(redis_client.client_id())
    return {
        str(c["id"]): str(c.get("name", ""))
        for c in redis_client.client_list()
        if int(str(c["addr"]).rsplit(":", 1)[1]) in ports and str(c["id"]) != own
    }


def held_task() -> pb.EnqueueAtRequest:
    """A task due in an hour: it stays in the database (SCHEDULED), so its streams stay open."""
    request = pb.EnqueueAtRequest(task_name="demo.add", args=args(1, 2))
    request.run_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    return request


async def test_streams_share_a_few_redis_connections_and_release_on_cancel(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime, redis_client: redis.Redis
) -> None:
    task_ids = [(await stub.EnqueueAt(held_task())).task_id for _ in range(6)]
    # the gateway shares this process with the other tests' clients: count its named
    # connections, and any connection that appears while the streams open
    before = process_redis_connections(redis_client)
    calls = [stub.StreamProgress(pb.StreamProgressRequest(task_id=t)) for t in task_ids for _ in range(50)]
    for call in calls:
        assert (await call.read()).task.state == pb.TASK_STATE_SCHEDULED  # registered, snapshot sent
    assert runtime.hub.watcher_count >= len(calls) == 300
    after = process_redis_connections(redis_client)
    new = {i: name for i, name in after.items() if i not in before}
    named = {
        i: name for i, name in after.items() if name.startswith("taskgate") and f"-{os.getpid()}-" in name
    }
    # a stream costs an inbox, not a connection: one subscription, a read pool of at most 4
    # (the most it can grow by), and one small pool per adapter (publisher, state feed, cancel
    # marks, chord sizes, recovery's heartbeat and broker reads, queue depths) — however many
    # streams are open
    assert len(new) <= 4, new
    reads = [name for name in (named | new).values() if name.endswith("-reads")]
    assert len(reads) <= 4, reads
    others = [name for name in (named | new).values() if not name.endswith("-reads")]
    assert len(others) <= 10, others
    hub = hub_connections(redis_client)
    assert len(hub) <= 5, hub
    assert sum(1 for c in hub if str(c["name"]).endswith("-sub")) == 1
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


async def test_an_update_the_database_refuses_does_not_hold_back_the_others(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    held = pb.EnqueueAtRequest(task_name="demo.add", args=args(1, 2))
    held.run_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    good, bad = [(await stub.EnqueueAt(held)).task_id for _ in range(2)]
    now = dt.datetime.now(dt.UTC)
    runtime.recorder.record(TaskUpdate(task_id=good, state=TaskState.RUNNING, observed_time=now))
    # more retries than PostgreSQL's integer holds: the whole batch's UPDATE fails
    runtime.recorder.record(
        TaskUpdate(task_id=bad, state=TaskState.RETRYING, observed_time=now, retries=2**40)
    )
    await runtime.recorder.flush()
    stored_good, stored_bad = [await runtime.store.get(task_id) for task_id in (good, bad)]
    assert stored_good is not None and stored_good.state is TaskState.RUNNING
    assert stored_bad is not None and stored_bad.state is TaskState.SCHEDULED
    assert any(bad in record.getMessage() and "dropped" in record.getMessage() for record in caplog.records)


async def test_reconcile_reads_every_chunk(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime, redis_client: redis.Redis
) -> None:
    # states stored in Redis but never published (a missed message): only a reconcile pass
    # finds them, reading RECONCILE_CHUNK of them per MGET
    count = RECONCILE_CHUNK + RECONCILE_CHUNK // 2
    request = pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue="nobody-listens")
    task_ids = [(await stub.Enqueue(request)).task_id for _ in range(count)]
    deadline = time.monotonic() + 10
    while set(task_ids) - set(await runtime.store.active_ids(100_000)):  # published and marked
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for task_id in task_ids:
        document = json.dumps({"status": "SUCCESS", "result": 3, "task_id": task_id})
        redis_client.set(f"{runtime.settings.task_meta_prefix}{task_id}", document)
    assert await runtime.recorder.reconcile(runtime.hub, limit=100_000) >= count
    await runtime.recorder.flush()
    for task_id in task_ids:
        record = await runtime.store.get(task_id)
        assert record is not None and record.state is TaskState.SUCCEEDED and record.result == 3
