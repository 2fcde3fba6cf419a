"""The taskgate client library and the task-queue adapters, against the real server and worker.

The server runs on the test's own event loop: blocking (sync) client code runs in
``asyncio.to_thread`` so the loop stays free to answer it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
from collections.abc import AsyncIterator

import grpc
import pytest
from celery import Celery
from grpc import aio

from service.config import Settings
from taskgate.adapter import CeleryTaskQueue, TaskgateTaskQueue, TaskQueuePort
from taskgate.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Task,
    TaskCall,
    TaskFailed,
    TaskgateError,
    TaskState,
)
from taskgate.worker.contract import common_conf


@pytest.fixture
def target(server_port: int) -> str:
    return f"127.0.0.1:{server_port}"


@pytest.fixture
async def client(target: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(target) as client:
        yield client


def in_future(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def assert_utc(moment: dt.datetime | None) -> None:
    assert moment is not None
    assert moment.utcoffset() == dt.timedelta(0)


# --- AsyncClient ---------------------------------------------------------------------------


async def test_enqueue_then_wait_returns_the_int_result(client: AsyncClient) -> None:
    task_id = await client.enqueue("demo.add", 2, 3)
    task = await client.wait(task_id, timeout=60)
    assert isinstance(task, Task)
    assert task.task_id == task_id
    assert task.task_name == "demo.add"
    assert task.state is TaskState.SUCCEEDED
    assert task.state == "SUCCEEDED"
    assert task.result == 5
    assert type(task.result) is int
    assert task.error is None
    assert task.retries == 0
    assert task.queue == ""
    for moment in (task.create_time, task.run_time, task.start_time, task.end_time):
        assert_utc(moment)
    assert task.create_time is not None
    assert task.start_time is not None
    assert task.end_time is not None
    assert task.create_time <= task.start_time <= task.end_time
    again = await client.status(task_id)
    assert (again.state, again.result, again.end_time) == (task.state, task.result, task.end_time)


async def test_kwargs_request_id_and_options_reach_the_server(client: AsyncClient) -> None:
    request_id = f"client-{dt.datetime.now().timestamp()}"
    first = await client.send_task(
        "demo.add", [1.5], {"y": 2}, request_id=request_id, priority=3, headers={"x-origin": "test"}
    )
    again = await client.send_task(
        "demo.add", [1.5], {"y": 2}, request_id=request_id, priority=3, headers={"x-origin": "test"}
    )
    assert again == first
    task = await client.wait(first, timeout=60)
    assert task.result == 3.5
    assert task.request_id == request_id


async def test_countdown_schedules_the_task(client: AsyncClient) -> None:
    task_id = await client.send_task("demo.add", (1, 1), countdown=dt.timedelta(seconds=1.5))
    assert (await client.status(task_id)).state is TaskState.SCHEDULED
    task = await client.wait(task_id, timeout=60)
    assert task.result == 2
    assert task.start_time is not None
    assert task.run_time is not None
    assert task.start_time >= task.run_time


async def test_enqueue_at_is_scheduled_then_succeeds(client: AsyncClient) -> None:
    run_time = in_future(2)
    task_id = await client.enqueue_at("demo.add", run_time, 2, 2)
    scheduled = await client.status(task_id)
    assert scheduled.state is TaskState.SCHEDULED
    assert scheduled.run_time == run_time
    task = await client.wait(task_id, timeout=60)
    assert task.state is TaskState.SUCCEEDED
    assert task.result == 4
    assert task.start_time is not None
    assert task.start_time >= run_time


async def test_progress_streams_every_step_and_ends_succeeded(client: AsyncClient) -> None:
    task_id = await client.enqueue("demo.progress", 3, interval=0.1)
    seen = [task async for task in client.progress(task_id, timeout=60)]
    currents = [task.progress.current for task in seen if task.progress is not None]
    assert {1, 2, 3} <= set(currents)
    assert currents == sorted(currents)
    last = seen[-1]
    assert last.state is TaskState.SUCCEEDED
    assert all(not task.state.terminal for task in seen[:-1])
    assert last.result == 3
    assert last.progress is not None
    assert last.progress.total == 3
    assert last.progress.message == "step 3 of 3"
    assert last.progress.details == {}


async def test_breaking_out_of_progress_early_is_fine(client: AsyncClient) -> None:
    task_id = await client.enqueue("demo.progress", 3, interval=0.1)
    stream = client.progress(task_id)
    first = await anext(stream)
    assert first.task_id == task_id
    await stream.aclose()
    assert (await client.wait(task_id, timeout=60)).result == 3


async def test_wait_on_a_failing_task_raises_task_failed(client: AsyncClient) -> None:
    task_id = await client.enqueue("demo.fail", "disk on fire")
    with pytest.raises(TaskFailed, match="disk on fire") as caught:
        await client.wait(task_id, timeout=60)
    failed = caught.value
    assert isinstance(failed, TaskgateError)
    assert failed.task.task_id == task_id
    assert failed.task.state is TaskState.FAILED
    assert failed.task.error is not None
    assert failed.task.error.type == "DemoError"
    assert "disk on fire" in failed.task.error.message
    assert "Traceback" in failed.task.error.traceback
    assert failed.task.result is None
    assert "disk on fire" in failed.details
    copy = pickle.loads(pickle.dumps(failed))
    assert isinstance(copy, TaskFailed)
    assert copy.task == failed.task


async def test_unknown_task_id_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as caught:
        await client.status("nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in caught.value.details
    assert isinstance(caught.value.__cause__, aio.AioRpcError)
    with pytest.raises(NotFound):
        await client.wait("nope", timeout=10)
    with pytest.raises(NotFound):
        async for _ in client.progress("nope"):
            pass


async def test_unknown_task_name_is_invalid_argument(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.enqueue("demo.nope")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "demo.nope" in caught.value.details
    with pytest.raises(InvalidArgument, match="missing a required argument"):
        await client.enqueue_at("demo.add", in_future(1), 1)


async def test_wait_times_out_with_timeout_error(client: AsyncClient) -> None:
    task_id = await client.enqueue("demo.sleep", 5)
    with pytest.raises(TimeoutError) as caught:
        await client.wait(task_id, timeout=0.5)
    assert isinstance(caught.value, DeadlineExceeded)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert task_id in str(caught.value)
    assert not (await client.status(task_id)).state.terminal


async def test_bad_arguments_are_refused_before_sending(client: AsyncClient) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.enqueue_at("demo.add", dt.datetime.now(), 1, 2)
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.send_task("demo.add", (1, 2), expire_time=dt.datetime.now())
    with pytest.raises(ValueError, match="too large"):
        await client.enqueue("demo.add", 2**60, 1)
    with pytest.raises(TypeError, match="cannot be sent"):
        await client.enqueue("demo.add", object(), 1)


async def test_unreachable_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(TaskgateError) as caught:
            await client.status("anything")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


# --- Client (blocking) ---------------------------------------------------------------------


async def test_sync_client_enqueues_waits_and_streams(target: str) -> None:
    def scenario() -> tuple[Task, Task, list[Task]]:
        with Client(target) as sync:
            done = sync.wait(sync.enqueue("demo.add", 2, 3), timeout=60)
            scheduled = sync.status(sync.enqueue_at("demo.add", in_future(30), 1, 1))
            streamed = list(sync.progress(sync.enqueue("demo.progress", 2, interval=0.05), timeout=60))
            return done, scheduled, streamed

    done, scheduled, streamed = await asyncio.to_thread(scenario)
    assert done.state is TaskState.SUCCEEDED
    assert done.result == 5
    assert type(done.result) is int
    assert scheduled.state is TaskState.SCHEDULED
    assert streamed[-1].state is TaskState.SUCCEEDED
    assert {1, 2} <= {t.progress.current for t in streamed if t.progress is not None}


async def test_sync_client_errors(target: str) -> None:
    def scenario() -> list[BaseException]:
        caught: list[BaseException] = []
        with Client(target) as sync:
            for call in (
                lambda: sync.status("nope"),
                lambda: sync.enqueue("demo.nope"),
                lambda: sync.wait(sync.enqueue("demo.fail", "sync boom"), timeout=60),
                lambda: sync.wait(sync.enqueue("demo.sleep", 5), timeout=0.5),
            ):
                try:
                    call()
                except TaskgateError as exc:
                    caught.append(exc)
        return caught

    not_found, invalid, failed, timed_out = await asyncio.to_thread(scenario)
    assert isinstance(not_found, NotFound)
    assert isinstance(not_found.__cause__, grpc.RpcError)
    assert isinstance(invalid, InvalidArgument)
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(failed, TaskFailed)
    assert failed.task.error is not None
    assert "sync boom" in failed.task.error.message
    assert isinstance(timed_out, TimeoutError)


# --- adapters ------------------------------------------------------------------------------


async def test_taskgate_task_queue_enqueue(target: str, client: AsyncClient) -> None:
    def send() -> str:
        with Client(target) as sync:
            queue: TaskQueuePort = TaskgateTaskQueue(sync)
            return queue.enqueue("demo.add", 2, 3)

    task_id = await asyncio.to_thread(send)
    task = await client.wait(task_id, timeout=60)
    assert task.state is TaskState.SUCCEEDED
    assert task.result == 5


async def test_taskgate_task_queue_enqueue_at_and_options(target: str, client: AsyncClient) -> None:
    eta = in_future(1)

    def send() -> tuple[str, str]:
        with Client(target) as sync:
            queue = TaskgateTaskQueue(sync)
            assert isinstance(queue, TaskQueuePort)
            later = queue.enqueue_at("demo.add", eta, 4, y=5)
            delayed = queue.enqueue("demo.add", 1, 2, countdown=0.5, queue="celery")
            return later, delayed

    later, delayed = await asyncio.to_thread(send)
    task = await client.wait(later, timeout=60)
    assert task.state is TaskState.SUCCEEDED
    assert task.result == 9
    assert task.start_time is not None
    assert task.start_time >= eta
    delayed_task = await client.wait(delayed, timeout=60)
    assert delayed_task.result == 3
    assert delayed_task.queue == "celery"


def test_taskgate_task_queue_refuses_a_kwarg_given_both_ways() -> None:
    with Client("127.0.0.1:1") as sync:
        queue = TaskgateTaskQueue(sync)
        with pytest.raises(TypeError, match="both"):
            queue.enqueue("demo.add", 1, kwargs={"y": 2}, y=2)
        with pytest.raises(TypeError, match="both"):
            queue.enqueue_at("demo.add", in_future(1), 1, kwargs={"y": 2}, y=2)


async def test_celery_task_queue_is_the_same_port(settings: Settings, worker: object) -> None:
    app = Celery("test-port", set_as_current=False)
    app.conf.update(common_conf(settings), result_backend=settings.result_backend)

    def send_and_get() -> tuple[object, object]:
        queue: TaskQueuePort = CeleryTaskQueue(app)
        now_id = queue.enqueue("demo.add", 2, 3, queue="celery")
        later_id = queue.enqueue_at("demo.add", in_future(1), 4, y=5)
        return app.AsyncResult(now_id).get(timeout=60), app.AsyncResult(later_id).get(timeout=60)

    try:
        assert await asyncio.to_thread(send_and_get) == (5, 9)
    finally:
        app.close()


async def test_example_runs_against_the_gateway(
    target: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples import fastapi_port

    monkeypatch.setenv("TASKGATE_TARGET", target)
    await asyncio.to_thread(fastapi_port.main)
    out = capsys.readouterr().out
    assert "enqueued demo.add" in out
    assert "demo.add SUCCEEDED: result=3" in out


async def test_enqueue_batch_returns_ids_in_order_and_names_a_bad_task(client: AsyncClient) -> None:
    calls = [TaskCall("demo.add", (i, 10)) for i in range(5)]
    calls.append(TaskCall("demo.add", kwargs={"x": 1, "y": 2}, run_time=in_future(0.5)))
    ids = await client.enqueue_batch(calls, request_id=f"client-batch-{dt.datetime.now(dt.UTC).timestamp()}")
    assert len(ids) == 6
    results = [(await client.wait(task_id, timeout=60)).result for task_id in ids]
    assert results == [10, 11, 12, 13, 14, 3]
    with pytest.raises(InvalidArgument, match=r"^tasks\[1\]: task_name 'demo.nope'"):
        await client.enqueue_batch([TaskCall("demo.add", (1, 2)), TaskCall("demo.nope")])
    with pytest.raises(ValueError, match="not both"):
        await client.enqueue_batch([TaskCall("demo.add", (1, 2), countdown=1, run_time=in_future(1))])
