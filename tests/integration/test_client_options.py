"""Task keyword arguments and enqueue options never mix, against the real gateway and worker.

``enqueue`` (like Celery's ``delay``) sends every keyword to the task; ``send_task`` (like
``apply_async``) takes the task's ``args``/``kwargs`` and the options apart. ``demo.echo``
returns the keyword arguments it was called with.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpc import aio

from taskgate import (
    AlreadyExists,
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    Task,
    TaskCall,
    TaskgateTaskQueue,
    TaskState,
)

#: A keyword argument named like every option of send_task (and like enqueue's own parameters).
LOOKALIKES: dict[str, Any] = {
    "queue": "not-a-queue",
    "priority": "high",
    "countdown": 3600,
    "run_time": "tomorrow",
    "expire_time": "1970-01-01T00:00:00Z",
    "headers": {"x-origin": "task"},
    "request_id": "the task's own",
    "task_name": "the task's own",
    "args": [1, 2],
    "kwargs": {"nested": True},
}


@pytest.fixture
def target(server_port: int) -> str:
    return f"127.0.0.1:{server_port}"


@pytest.fixture
async def client(target: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(target) as client:
        yield client


def in_future(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"


def assert_ran_plainly(task: Task, kwargs: dict[str, Any]) -> None:
    """The task ran at once, on the default route, with no request_id, and saw ``kwargs``."""
    assert task.state is TaskState.SUCCEEDED
    assert task.result == kwargs
    assert task.queue == ""
    assert task.request_id == ""


# --- enqueue: every keyword goes to the task ------------------------------------------------


async def test_enqueue_sends_kwargs_named_like_options_to_the_task(client: AsyncClient) -> None:
    task_id = await client.enqueue("demo.echo", **LOOKALIKES)
    assert_ran_plainly(await client.wait(task_id, timeout=60), LOOKALIKES)


async def test_a_request_id_kwarg_does_not_deduplicate(client: AsyncClient) -> None:
    first = await client.enqueue("demo.echo", request_id="same")
    second = await client.enqueue("demo.echo", request_id="same")
    assert first != second


async def test_enqueue_at_sends_kwargs_named_like_options_to_the_task(client: AsyncClient) -> None:
    run_time = in_future(1)
    task_id = await client.enqueue_at("demo.echo", run_time, **LOOKALIKES)
    task = await client.wait(task_id, timeout=60)
    assert_ran_plainly(task, LOOKALIKES)
    assert task.run_time == run_time


async def test_sync_enqueue_sends_kwargs_named_like_options_to_the_task(target: str) -> None:
    def scenario() -> Task:
        with Client(target) as sync:
            return sync.wait(sync.enqueue("demo.echo", **LOOKALIKES), timeout=60)

    assert_ran_plainly(await asyncio.to_thread(scenario), LOOKALIKES)


# --- send_task: options apart from the task's arguments -------------------------------------


async def test_send_task_queue_routes_and_kwargs_stay_the_tasks(client: AsyncClient) -> None:
    task_id = await client.send_task("demo.echo", kwargs={"queue": "task's"}, queue="celery")
    task = await client.wait(task_id, timeout=60)
    assert task.result == {"queue": "task's"}
    assert task.queue == "celery"


async def test_send_task_to_a_queue_no_worker_reads_stays_queued(client: AsyncClient) -> None:
    queue = unique("nobody")
    task = await client.status(await client.send_task("demo.echo", queue=queue))
    assert task.state is TaskState.QUEUED
    assert task.queue == queue


async def test_send_task_priority_is_an_option(client: AsyncClient) -> None:
    task_id = await client.send_task("demo.echo", kwargs={"priority": 99}, priority=0)
    assert (await client.wait(task_id, timeout=60)).result == {"priority": 99}
    with pytest.raises(InvalidArgument, match="priority"):
        await client.send_task("demo.echo", priority=10)


async def test_send_task_countdown_schedules_the_task(client: AsyncClient) -> None:
    task_id = await client.send_task("demo.echo", kwargs={"countdown": 0}, countdown=1.5)
    assert (await client.status(task_id)).state is TaskState.SCHEDULED
    task = await client.wait(task_id, timeout=60)
    assert task.result == {"countdown": 0}
    assert task.run_time is not None
    assert task.start_time is not None
    assert task.start_time >= task.run_time


async def test_send_task_run_time_uses_enqueue_at(client: AsyncClient) -> None:
    run_time = in_future(1.5)
    task_id = await client.send_task("demo.echo", (), {"run_time": "task's"}, run_time=run_time)
    scheduled = await client.status(task_id)
    assert scheduled.state is TaskState.SCHEDULED
    assert scheduled.run_time == run_time
    assert (await client.wait(task_id, timeout=60)).result == {"run_time": "task's"}


async def test_send_task_expire_time_is_an_option(client: AsyncClient) -> None:
    task_id = await client.send_task("demo.echo", kwargs={"expire_time": 1}, expire_time=in_future(600))
    assert (await client.wait(task_id, timeout=60)).result == {"expire_time": 1}
    with pytest.raises(InvalidArgument, match="expire_time"):
        await client.send_task("demo.echo", countdown=60, expire_time=in_future(30))


async def test_send_task_request_id_deduplicates(client: AsyncClient) -> None:
    request_id = unique("options")
    first = await client.send_task("demo.echo", kwargs={"request_id": "x"}, request_id=request_id)
    again = await client.send_task("demo.echo", kwargs={"request_id": "x"}, request_id=request_id)
    assert again == first
    task = await client.wait(first, timeout=60)
    assert task.request_id == request_id
    assert task.result == {"request_id": "x"}
    with pytest.raises(AlreadyExists):
        await client.send_task("demo.echo", kwargs={"request_id": "y"}, request_id=request_id)


async def test_sync_send_task_and_stream_errors(target: str) -> None:
    def scenario() -> tuple[Task, BaseException]:
        with Client(target) as sync:
            task = sync.wait(
                sync.send_task("demo.echo", kwargs={"headers": 1}, headers={"x-origin": "test"}), timeout=60
            )
            try:
                list(sync.progress("nope", timeout=30))
            except NotFound as exc:
                return task, exc
            raise AssertionError("progress of an unknown id did not raise NotFound")

    task, not_found = await asyncio.to_thread(scenario)
    assert task.result == {"headers": 1}
    assert not_found.__cause__ is not None


async def test_async_stream_error_keeps_the_grpc_cause(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as caught:
        async for _ in client.progress("nope", timeout=30):
            pass
    assert isinstance(caught.value.__cause__, aio.AioRpcError)


async def test_batch_task_calls_keep_kwargs_and_options_apart(client: AsyncClient) -> None:
    ids = await client.enqueue_batch(
        [
            TaskCall("demo.echo", (), {"queue": "task's"}, queue="celery"),
            TaskCall("demo.echo", (), LOOKALIKES),
        ]
    )
    routed, plain = [await client.wait(task_id, timeout=60) for task_id in ids]
    assert (routed.result, routed.queue) == ({"queue": "task's"}, "celery")
    assert_ran_plainly(plain, LOOKALIKES)


# --- the adapter ----------------------------------------------------------------------------


async def test_adapter_kwargs_mapping_carries_task_parameters_named_like_its_options(
    target: str, client: AsyncClient
) -> None:
    def send() -> tuple[str, str]:
        with Client(target) as sync:
            queue = TaskgateTaskQueue(sync)
            routed = queue.enqueue(
                "demo.echo", kwargs={"queue": "task's", "countdown": 7}, queue="celery", x=1
            )
            plain = queue.enqueue("demo.echo", priority=1, request_id="task's")
            return routed, plain

    routed_id, plain_id = await asyncio.to_thread(send)
    routed = await client.wait(routed_id, timeout=60)
    assert routed.result == {"queue": "task's", "countdown": 7, "x": 1}
    assert routed.queue == "celery"
    assert_ran_plainly(await client.wait(plain_id, timeout=60), {"priority": 1, "request_id": "task's"})
