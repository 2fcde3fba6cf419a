"""CancelTask and WaitTask against the real stack (the session's thread-pool worker)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from pathlib import Path

import grpc
import redis
from google.protobuf import duration_pb2

from service.app import Runtime
from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.worker.contract import RedisKeys
from tests.helpers import args, wait_state
from tests.security import add, bearer, held_task, refused, secured_stub, write_auth_file


async def test_a_held_task_is_cancelled_at_once_and_never_published(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime, settings: Settings, redis_client: redis.Redis
) -> None:
    task_id = (await stub.EnqueueAt(held_task())).task_id
    response = await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id, reason="not needed"))
    assert response.task.state == pb.TASK_STATE_CANCELLED
    assert response.task.cancel_requested and response.task.HasField("end_time")
    await runtime.outbox.run_once()  # a relay pass: nothing of it is published
    async with runtime.store.engine.connect() as conn:
        row = (
            await conn.exec_driver_sql(
                f"SELECT publish_after, publish_time FROM tasks WHERE task_id = '{task_id}'"
            )
        ).one()
    assert row == (None, None)
    assert redis_client.exists(RedisKeys(settings.key_prefix).cancel_mark(task_id))


async def test_cancel_is_idempotent_and_finished_tasks_stay_unchanged(stub: pb_grpc.TaskServiceStub) -> None:
    held = (await stub.EnqueueAt(held_task())).task_id
    first = (await stub.CancelTask(pb.CancelTaskRequest(task_id=held))).task
    again = (await stub.CancelTask(pb.CancelTaskRequest(task_id=held))).task
    assert first == again
    done = (await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2)))).task_id
    finished = await wait_state(stub, done)
    assert finished.state == pb.TASK_STATE_SUCCEEDED
    after = (await stub.CancelTask(pb.CancelTaskRequest(task_id=done))).task
    assert after.state == pb.TASK_STATE_SUCCEEDED and not after.cancel_requested


async def test_a_queued_task_no_worker_has_started_is_cancelled(stub: pb_grpc.TaskServiceStub) -> None:
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    task_id = (
        await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue=queue))
    ).task_id
    await asyncio.sleep(0.5)  # let the outbox hand it to the broker
    task = (await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id))).task
    assert task.state == pb.TASK_STATE_CANCELLED


async def test_a_watching_stream_ends_with_cancelled(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = (await stub.EnqueueAt(held_task())).task_id
    seen: list[int] = []

    async def watch() -> None:
        async for message in stub.StreamProgress(pb.StreamProgressRequest(task_id=task_id)):
            seen.append(message.task.state)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.5)
    await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id))
    await asyncio.wait_for(watcher, 15)
    assert seen[0] == pb.TASK_STATE_SCHEDULED and seen[-1] == pb.TASK_STATE_CANCELLED


async def test_unknown_ids_and_other_callers_tasks(runtime: Runtime, tmp_path: Path) -> None:
    async with secured_stub(runtime, write_auth_file(tmp_path)) as secured:
        error = await refused(
            secured.CancelTask(pb.CancelTaskRequest(task_id=str(uuid.uuid4())), metadata=bearer("other"))
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        mine = (await secured.Enqueue(add(), metadata=bearer("billing"))).task_id
        error = await refused(
            secured.CancelTask(pb.CancelTaskRequest(task_id=mine), metadata=bearer("other"))
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND  # other may not read billing's task
        error = await refused(
            secured.CancelTask(pb.CancelTaskRequest(task_id=mine), metadata=bearer("reader"))
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # reader reads all, enqueues nothing
        error = await refused(secured.WaitTask(pb.WaitTaskRequest(task_id=mine), metadata=bearer("other")))
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_wait_returns_the_finished_task(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = (await stub.Enqueue(pb.EnqueueRequest(task_name="demo.sleep", args=args(0.5)))).task_id
    task = (await stub.WaitTask(pb.WaitTaskRequest(task_id=task_id))).task
    assert task.state == pb.TASK_STATE_SUCCEEDED


async def test_wait_returns_the_current_state_at_the_timeout(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = (await stub.EnqueueAt(held_task())).task_id
    started = time.monotonic()
    request = pb.WaitTaskRequest(task_id=task_id, timeout=duration_pb2.Duration(nanos=300_000_000))
    task = (await stub.WaitTask(request)).task
    assert task.state == pb.TASK_STATE_SCHEDULED
    assert time.monotonic() - started < 30  # it did return (not a timing assertion)


async def test_wait_rejects_a_negative_timeout(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = (await stub.EnqueueAt(held_task())).task_id
    request = pb.WaitTaskRequest(task_id=task_id, timeout=duration_pb2.Duration(seconds=-1))
    error = await refused(stub.WaitTask(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_time_limits_reach_the_message(runtime: Runtime) -> None:
    from service.broker.redis_message import RedisLayout, build_message
    from service.domain.model import Delivery

    now = dt.datetime.now(dt.UTC)
    delivery = Delivery("id", "demo.add", [], {}, now, time_limit=5.0, soft_time_limit=2.0)
    assert b'"timelimit":[5.0,2.0]' in build_message(delivery, RedisLayout(), now)
