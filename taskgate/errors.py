"""What the taskgate client raises.

::

    TaskgateError                .code: grpc.StatusCode, .details: str
    ├── InvalidArgument          INVALID_ARGUMENT   unknown task, arguments that do not bind, bad field
    ├── NotFound                 NOT_FOUND          no task with that id was enqueued through the gateway
    ├── AlreadyExists            ALREADY_EXISTS     request_id reused with a different request
    ├── Unavailable              UNAVAILABLE        gateway or its database unreachable; retry
    ├── PermissionDenied         PERMISSION_DENIED
    ├── Unauthenticated          UNAUTHENTICATED
    ├── ResourceExhausted        RESOURCE_EXHAUSTED
    ├── DeadlineExceeded         DEADLINE_EXCEEDED  also a TimeoutError (wait() raises it on timeout)
    ├── Internal                 INTERNAL, UNKNOWN, DATA_LOSS
    └── TaskFailed               OK                 the calls worked; the task ended FAILED or CANCELLED

Any other status is a plain TaskgateError with that code. ``from_rpc_error`` turns a gRPC error
into one of these; the client calls it in one place, its ``_rpc_errors()`` context manager
(``taskgate.client``), which wraps every call and every stream read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from taskgate._convert import Task


class TaskgateError(Exception):
    """Base of everything the client raises for a failed call or a failed task."""

    #: The gRPC status of the call (OK for TaskFailed: the calls worked, the task did not).
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        #: The server's message (or the client's, for errors raised here).
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgument(TaskgateError):
    """The request is malformed: unknown task name, arguments that do not bind, a bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TaskgateError):
    """No task with this id was enqueued through the gateway."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TaskgateError):
    """The request_id was used before with a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(TaskgateError):
    """The gateway, or something it depends on, cannot be reached; retrying may work."""

    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(TaskgateError):
    """The caller is not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(TaskgateError):
    """The caller's credentials are missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(TaskgateError):
    """A quota or a size limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(TaskgateError, TimeoutError):
    """The call, or the wait, did not finish in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(TaskgateError):
    """The server failed in a way it did not expect; its log has the details."""

    code = grpc.StatusCode.INTERNAL


class TaskFailed(TaskgateError):
    """The task ended FAILED or CANCELLED; ``.task`` is its final snapshot."""

    code = grpc.StatusCode.OK

    def __init__(self, task: Task) -> None:
        what = f"task {task.task_id} ({task.task_name}) ended {task.state.value}"
        if task.error is not None:
            what = f"{what}: {task.error.type}: {task.error.message}"
        super().__init__(what)
        self.task = task

    def __reduce__(self) -> tuple[type[TaskFailed], tuple[Task]]:
        return (type(self), (self.task,))


_BY_CODE: dict[grpc.StatusCode, type[TaskgateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}


def from_rpc_error(exc: grpc.RpcError) -> TaskgateError:
    """The TaskgateError for a failed gRPC call (sync ``grpc.RpcError`` or ``aio.AioRpcError``).

    Use as ``raise from_rpc_error(exc) from exc``.
    """
    # grpc.RpcError itself has no code(); the errors gRPC raises are also Calls, which do.
    code_of = getattr(exc, "code", None)
    details_of = getattr(exc, "details", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    if not isinstance(details, str) or not details:
        details = str(exc) or code.name
    return _BY_CODE.get(code, TaskgateError)(details, code)


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Turn a gRPC error raised in the block into its TaskgateError: the clients' one boundary.

    For unary calls, ``with rpc_errors(): response = stub.Method(request)``; around a stream's
    loop it covers every message read, generators included (closing one passes straight through).
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
