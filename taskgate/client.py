"""Typed Python clients for the taskgate gateway: ``AsyncClient`` (grpc.aio) and ``Client`` (blocking).

::

    async with AsyncClient("127.0.0.1:50051") as client:
        task_id = await client.enqueue("demo.add", 2, 3)
        task = await client.wait(task_id, timeout=60)
        assert task.result == 5

Task arguments travel as JSON (protobuf Struct/ListValue): None, bool, int, float, str, and
lists/tuples and str-keyed mappings of them. Numbers with no fractional part reach the task,
and come back in results, as ints. Datetimes must be timezone-aware.

Failed calls raise ``taskgate.errors.TaskgateError`` subclasses (re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from typing import Any, Self

import grpc
from grpc import aio

from taskgate import _convert
from taskgate._control import AsyncControl, Control
from taskgate._convert import Progress, Task, TaskCall, TaskErrorInfo, TaskPage, TaskState
from taskgate._operations import AsyncOperations, Operations, QueueInfo, WorkerInfo
from taskgate._schedules import AsyncSchedules, Schedule, SchedulePage, Schedules
from taskgate.errors import (
    AlreadyExists,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TaskFailed,
    TaskgateError,
    Unauthenticated,
    Unavailable,
)
from taskgate.errors import rpc_errors as _rpc_errors
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.workflow import AsyncWorkflows, Workflows

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Progress",
    "QueueInfo",
    "ResourceExhausted",
    "Schedule",
    "SchedulePage",
    "Task",
    "TaskCall",
    "TaskErrorInfo",
    "TaskFailed",
    "TaskPage",
    "TaskState",
    "TaskgateError",
    "Unauthenticated",
    "Unavailable",
    "WorkerInfo",
]


def _finished(task: Task) -> Task:
    """``task`` if it succeeded; TaskFailed if it ended FAILED or CANCELLED."""
    if task.state is not TaskState.SUCCEEDED:
        raise TaskFailed(task)
    return task


def _timed_out(task_id: str, timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"task {task_id} did not end within {timeout:g} s")


class _Retry:
    """The deadline and backoff of ``wait``: it re-opens a stream the server ended UNAVAILABLE."""

    def __init__(self, clock: Callable[[], float], timeout: float | None) -> None:
        self._clock = clock
        self._timeout = timeout
        self._deadline = None if timeout is None else clock() + timeout
        self._pause = 0.1

    def remaining(self) -> float | None:
        """Seconds left for the next stream; None without a timeout."""
        return None if self._deadline is None else max(self._deadline - self._clock(), 0.001)

    def timed_out(self, task_id: str, exc: DeadlineExceeded) -> DeadlineExceeded:
        """The error ``wait`` raises when its time is up."""
        return exc if self._timeout is None else _timed_out(task_id, self._timeout)

    def next_pause(self, task_id: str, exc: Unavailable) -> float:
        """Seconds to sleep before the next try (0.1 s doubling to 2 s), within the deadline.

        Raises:
            DeadlineExceeded: no time is left for another try.
        """
        pause, self._pause = self._pause, min(self._pause * 2, 2.0)
        left = self.remaining()
        if left is not None and left <= pause:
            raise self.timed_out(task_id, DeadlineExceeded(str(exc))) from exc
        return pause


def _cut_short(task_id: str) -> Internal:
    return Internal(f"the progress stream of task {task_id} ended before the task did")


class AsyncClient(AsyncControl, AsyncSchedules, AsyncWorkflows, AsyncOperations):
    """The taskgate API on a grpc.aio channel. Use it as ``async with AsyncClient(target) as c:``.

    Build it inside the event loop that uses it (a grpc.aio channel belongs to one loop).

    Args:
        target: the gateway's address, ``host:port``.
        credentials: TLS channel credentials; None means a plaintext channel.
        metadata: key/value pairs sent with every call (for example an authorization header).
        timeout: deadline in seconds for each unary call (the enqueue calls, send_task, status);
            None means none. ``progress`` and ``wait`` have their own.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 30,
    ) -> None:
        if credentials is None:
            self._channel = aio.insecure_channel(target)
        else:
            self._channel = aio.secure_channel(target, credentials)
        self._stub = pb_grpc.TaskServiceStub(self._channel)
        self._metadata = tuple((key, value) for key, value in metadata)
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close()

    async def enqueue(self, task_name: str, /, *args: Any, **kwargs: Any) -> str:
        """Run ``task_name(*args, **kwargs)`` as soon as a worker is free; return the task id.

        Like Celery's ``delay()``: every keyword argument goes to the task, whatever its name.
        For options (queue, countdown, request_id, ...) use ``send_task``.
        """
        return await self.send_task(task_name, args, kwargs)

    async def enqueue_at(self, task_name: str, run_time: dt.datetime, /, *args: Any, **kwargs: Any) -> str:
        """Run ``task_name(*args, **kwargs)`` at ``run_time`` (aware); return the task id.

        Every keyword argument goes to the task, as with ``enqueue``.
        """
        return await self.send_task(task_name, args, kwargs, run_time=run_time)

    async def send_task(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        countdown: float | dt.timedelta | None = None,
        run_time: dt.datetime | None = None,
        expire_time: dt.datetime | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Run ``task_name(*args, **kwargs)`` with options; return the task id.

        Like Celery's ``apply_async(args, kwargs, **options)``: the task's arguments and the
        options are separate parameters, so no task argument is mistaken for an option.

        Args:
            task_name: the registered Celery task name.
            args: positional task arguments (a list or a tuple).
            kwargs: keyword task arguments; None means none.
            queue: the Celery queue; None means the task's default route.
            priority: 0 to 9 (0 is the highest on Redis); None means the queue's default.
            countdown: seconds, or a timedelta, to wait before the task may start.
            run_time: when the task may start (aware); not together with ``countdown``.
            expire_time: after this (aware) time the task is discarded and ends CANCELLED.
            headers: extra Celery message headers.
            request_id: idempotency key: a repeat returns the first task's id (AlreadyExists
                when the request differs); None means no deduplication.

        Raises:
            ValueError, TypeError: arguments that cannot be sent (checked before sending).
            TaskgateError: the gateway refused the call (InvalidArgument, AlreadyExists, ...).
        """
        call = TaskCall(
            task_name, args, {} if kwargs is None else kwargs, queue=queue, priority=priority,
            countdown=countdown, run_time=run_time, expire_time=expire_time, headers=headers,
        )  # fmt: skip
        request = _convert.send_request(call, request_id)
        with _rpc_errors():
            if isinstance(request, pb.EnqueueAtRequest):
                return (
                    await self._stub.EnqueueAt(request, timeout=self._timeout, metadata=self._metadata)
                ).task_id
            return (await self._stub.Enqueue(request, timeout=self._timeout, metadata=self._metadata)).task_id

    async def enqueue_batch(self, tasks: Sequence[TaskCall], *, request_id: str | None = None) -> list[str]:
        """Enqueue every task in one call, all or nothing; return their ids in order.

        InvalidArgument names the first invalid task (``tasks[3]: ...``); a repeated
        ``request_id`` returns the first batch's ids.
        """
        request = _convert.batch_request(tasks, request_id)
        with _rpc_errors():
            response = await self._stub.EnqueueBatch(request, timeout=self._timeout, metadata=self._metadata)
        return [task.task_id for task in response.tasks]

    async def status(self, task_id: str) -> Task:
        """The task as it is now. NotFound for an id the gateway never enqueued."""
        request = pb.GetStatusRequest(task_id=task_id)
        with _rpc_errors():
            response = await self._stub.GetStatus(request, timeout=self._timeout, metadata=self._metadata)
        return _convert.task_from_proto(response.task)

    async def progress(self, task_id: str, *, timeout: float | None = None) -> AsyncGenerator[Task, None]:
        """The task's snapshot now, then one per change, ending after a terminal state.

        ``timeout`` bounds the whole stream (DeadlineExceeded); None means no limit. To stop
        early, ``aclose()`` the generator (or use ``contextlib.aclosing``): that cancels the call.
        NotFound for an id the gateway never enqueued.
        """
        request = pb.StreamProgressRequest(task_id=task_id)
        call = self._stub.StreamProgress(request, timeout=timeout, metadata=self._metadata)
        try:
            with _rpc_errors():
                async for response in call:
                    yield _convert.task_from_proto(response.task)
        finally:
            call.cancel()

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Wait for the task to end and return it.

        A stream the server ends with UNAVAILABLE (it is stopping, or unreachable for a
        moment) is opened again, with backoff, until ``timeout``.

        Raises:
            TaskFailed: it ended FAILED or CANCELLED (``.task`` has the error).
            DeadlineExceeded: it had not ended after ``timeout`` seconds (also a TimeoutError).
        """
        loop = asyncio.get_running_loop()
        retry = _Retry(loop.time, timeout)
        while True:
            try:
                async with contextlib.aclosing(self.progress(task_id, timeout=retry.remaining())) as stream:
                    async for task in stream:
                        if task.state.terminal:
                            return _finished(task)
                raise _cut_short(task_id)
            except DeadlineExceeded as exc:
                raise retry.timed_out(task_id, exc) from exc
            except Unavailable as exc:
                await asyncio.sleep(retry.next_pause(task_id, exc))


class Client(Control, Schedules, Workflows, Operations):
    """The taskgate API on a blocking gRPC channel; safe to share between threads.

    Use it as ``with Client(target) as c:``. Arguments as for ``AsyncClient``. Do not call it
    from a coroutine on an event loop that has work to do: it blocks the loop.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 30,
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, credentials)
        self._stub = pb_grpc.TaskServiceStub(self._channel)
        self._metadata = tuple((key, value) for key, value in metadata)
        self._timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def enqueue(self, task_name: str, /, *args: Any, **kwargs: Any) -> str:
        """As ``AsyncClient.enqueue``: every keyword argument goes to the task."""
        return self.send_task(task_name, args, kwargs)

    def enqueue_at(self, task_name: str, run_time: dt.datetime, /, *args: Any, **kwargs: Any) -> str:
        """As ``AsyncClient.enqueue_at``: every keyword argument goes to the task."""
        return self.send_task(task_name, args, kwargs, run_time=run_time)

    def send_task(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        countdown: float | dt.timedelta | None = None,
        run_time: dt.datetime | None = None,
        expire_time: dt.datetime | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> str:
        """As ``AsyncClient.send_task``: task arguments and options apart."""
        call = TaskCall(
            task_name, args, {} if kwargs is None else kwargs, queue=queue, priority=priority,
            countdown=countdown, run_time=run_time, expire_time=expire_time, headers=headers,
        )  # fmt: skip
        request = _convert.send_request(call, request_id)
        with _rpc_errors():
            if isinstance(request, pb.EnqueueAtRequest):
                return self._stub.EnqueueAt(request, timeout=self._timeout, metadata=self._metadata).task_id
            return self._stub.Enqueue(request, timeout=self._timeout, metadata=self._metadata).task_id

    def enqueue_batch(self, tasks: Sequence[TaskCall], *, request_id: str | None = None) -> list[str]:
        """As ``AsyncClient.enqueue_batch``."""
        request = _convert.batch_request(tasks, request_id)
        with _rpc_errors():
            response = self._stub.EnqueueBatch(request, timeout=self._timeout, metadata=self._metadata)
        return [task.task_id for task in response.tasks]

    def status(self, task_id: str) -> Task:
        """As ``AsyncClient.status``."""
        request = pb.GetStatusRequest(task_id=task_id)
        with _rpc_errors():
            response = self._stub.GetStatus(request, timeout=self._timeout, metadata=self._metadata)
        return _convert.task_from_proto(response.task)

    def progress(self, task_id: str, *, timeout: float | None = None) -> Generator[Task, None, None]:
        """As ``AsyncClient.progress``; ``close()`` the generator to stop early."""
        request = pb.StreamProgressRequest(task_id=task_id)
        call = self._stub.StreamProgress(request, timeout=timeout, metadata=self._metadata)
        try:
            with _rpc_errors():
                for response in call:
                    yield _convert.task_from_proto(response.task)
        finally:
            call.cancel()

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """As ``AsyncClient.wait``."""
        retry = _Retry(time.monotonic, timeout)
        while True:
            try:
                with contextlib.closing(self.progress(task_id, timeout=retry.remaining())) as stream:
                    for task in stream:
                        if task.state.terminal:
                            return _finished(task)
                raise _cut_short(task_id)
            except DeadlineExceeded as exc:
                raise retry.timed_out(task_id, exc) from exc
            except Unavailable as exc:
                time.sleep(retry.next_pause(task_id, exc))
