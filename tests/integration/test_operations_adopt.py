"""TASKGATE_ADOPT_FOREIGN: a task sent with Celery's own ``send_task`` (around the gateway),
run by the session worker, is recorded as adopted; with the setting off it stays NOT_FOUND."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy as sa
from grpc import aio

from service.app import Runtime
from service.broker.publisher import send_only_app
from service.config import Settings
from service.store.tables import tasks
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import enqueue, value, wait_state


@pytest.fixture
async def adopting(settings: Settings, runtime: Runtime) -> AsyncIterator[Runtime]:
    """A second gateway runtime on the session's database and Redis, adopting foreign tasks."""
    adopter = await Runtime.start(settings.model_copy(update={"adopt_foreign": True}))
    # the adopter must hear the worker's documents: its subscription is how it sees them in
    # this test (the state feed's entries may be read by the session gateway's consumer,
    # which has the same name in this process and does not adopt)
    deadline = time.monotonic() + 30
    while not adopter.hub.ready:
        assert time.monotonic() < deadline, "the adopting gateway's subscription never came up"
        await asyncio.sleep(0.05)
    yield adopter
    adopter.hub.begin_shutdown()
    await adopter.stop()


def _send_around(settings: Settings, *arguments: int) -> str:
    """``demo.add`` sent with Celery's own send_task, as an existing app would."""
    app = send_only_app(settings)
    try:
        return str(app.send_task("demo.add", args=arguments).id)
    finally:
        app.close()


async def _adopted(stub: pb_grpc.TaskServiceStub, task_id: str, timeout: float = 30) -> pb.Task:
    deadline = time.monotonic() + timeout
    while True:
        try:
            task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
            if task.state == pb.TASK_STATE_SUCCEEDED:
                return task
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, f"task {task_id} not adopted after {timeout}s"
        await asyncio.sleep(0.2)


async def test_a_task_sent_around_the_gateway_is_adopted(
    adopting: Runtime, stub: pb_grpc.TaskServiceStub, settings: Settings
) -> None:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    task_id = await asyncio.to_thread(_send_around, settings, 20, 22)
    task = await _adopted(stub, task_id)
    assert task.adopted
    assert task.task_name == "demo.add"
    assert task.queue == "celery"
    assert value(task.result) == 42
    assert task.HasField("start_time") and task.HasField("end_time")
    listing = await stub.ListTasks(
        pb.ListTasksRequest(
            filter=f'task_name = "demo.add" AND create_time >= "{since.isoformat()}"', page_size=1000
        )
    )
    listed = {t.task_id: t for t in listing.tasks}
    assert listed[task_id].adopted and listed[task_id].state == pb.TASK_STATE_SUCCEEDED
    async with adopting.store.engine.connect() as conn:
        row = (await conn.execute(sa.select(tasks).where(tasks.c.task_id == task_id))).mappings().one()
    assert (row["args"], row["kwargs"], row["caller"], row["publish_after"]) == ([20, 22], {}, "", None)


async def test_without_the_setting_it_stays_not_found(
    stub: pb_grpc.TaskServiceStub, settings: Settings
) -> None:
    task_id = await asyncio.to_thread(_send_around, settings, 1, 2)
    app = send_only_app(settings)
    app.conf.update(result_backend=settings.result_backend)
    try:
        assert await asyncio.to_thread(app.AsyncResult(task_id).get, timeout=30) == 3
    finally:
        app.close()
    # a task through the gateway finished after it: the recorder has seen both documents
    after = await enqueue(stub, "demo.add", 3, 4)
    await wait_state(stub, after)
    await asyncio.sleep(0.5)  # a flush interval and then some
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
