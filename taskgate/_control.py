"""CancelTask, ListTasks and WaitTask for the clients: the methods ``AsyncClient`` and
``Client`` get from the two mixins here."""

from __future__ import annotations

from taskgate import _convert
from taskgate._convert import Task, TaskPage
from taskgate.errors import rpc_errors as _rpc_errors
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc


class AsyncControl:
    """Cancel, list and wait on ``AsyncClient``."""

    _stub: pb_grpc.TaskServiceAsyncStub
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    async def cancel(self, task_id: str, *, terminate: bool = False, reason: str = "") -> Task:
        """Cancel the task (idempotent) and return it as it is after the request.

        A task not yet started ends CANCELLED at once; a running one gets
        ``cancel_requested`` and stops at its next checkpoint (``terminate``: its worker
        process is signalled). A finished task is returned unchanged. NotFound for an id the
        caller cannot read; PermissionDenied when it may not enqueue the task's name.
        """
        request = pb.CancelTaskRequest(task_id=task_id, terminate=terminate, reason=reason)
        with _rpc_errors():
            response = await self._stub.CancelTask(request, timeout=self._timeout, metadata=self._metadata)
        return _convert.task_from_proto(response.task)

    async def list_tasks(
        self, filter: str = "", *, order_by: str = "", page_size: int = 0, page_token: str = ""
    ) -> TaskPage:
        """One page of the tasks the caller may read, newest first by default.

        ``filter`` is AIP-160 (``state = FAILED AND task_name = "reports.*"``); pass the
        returned ``next_page_token`` with the same filter and order for the next page.
        """
        request = pb.ListTasksRequest(
            filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
        )
        with _rpc_errors():
            response = await self._stub.ListTasks(request, timeout=self._timeout, metadata=self._metadata)
        return TaskPage([_convert.task_from_proto(t) for t in response.tasks], response.next_page_token)

    async def wait_task(self, task_id: str, timeout: float | None = None) -> Task:
        """One WaitTask call: the task once terminal, or as it is after ``timeout`` seconds
        (None: the server's default, 60 s). Never raises for the task's own outcome."""
        request = pb.WaitTaskRequest(
            task_id=task_id, timeout=None if timeout is None else _convert.to_duration(timeout)
        )
        deadline = None if self._timeout is None else self._timeout + (timeout or 60.0)
        with _rpc_errors():
            response = await self._stub.WaitTask(request, timeout=deadline, metadata=self._metadata)
        return _convert.task_from_proto(response.task)


class Control:
    """Cancel, list and wait on ``Client``."""

    _stub: pb_grpc.TaskServiceStub
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    def cancel(self, task_id: str, *, terminate: bool = False, reason: str = "") -> Task:
        """As ``AsyncClient.cancel``."""
        request = pb.CancelTaskRequest(task_id=task_id, terminate=terminate, reason=reason)
        with _rpc_errors():
            response = self._stub.CancelTask(request, timeout=self._timeout, metadata=self._metadata)
        return _convert.task_from_proto(response.task)

    def list_tasks(
        self, filter: str = "", *, order_by: str = "", page_size: int = 0, page_token: str = ""
    ) -> TaskPage:
        """As ``AsyncClient.list_tasks``."""
        request = pb.ListTasksRequest(
            filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
        )
        with _rpc_errors():
            response = self._stub.ListTasks(request, timeout=self._timeout, metadata=self._metadata)
        return TaskPage([_convert.task_from_proto(t) for t in response.tasks], response.next_page_token)

    def wait_task(self, task_id: str, timeout: float | None = None) -> Task:
        """As ``AsyncClient.wait_task``."""
        request = pb.WaitTaskRequest(
            task_id=task_id, timeout=None if timeout is None else _convert.to_duration(timeout)
        )
        deadline = None if self._timeout is None else self._timeout + (timeout or 60.0)
        with _rpc_errors():
            response = self._stub.WaitTask(request, timeout=deadline, metadata=self._metadata)
        return _convert.task_from_proto(response.task)
