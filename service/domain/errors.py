"""The error tree, and the one place that turns errors into gRPC statuses.

::

    TaskgateError
    ├── InvalidRequest           INVALID_ARGUMENT  the request is malformed; fix it, do not retry
    │   ├── UnknownTask          INVALID_ARGUMENT  task_name is not in the catalog
    │   └── ArgumentsDoNotBind   INVALID_ARGUMENT  args/kwargs do not fit the task's signature
    ├── TaskNotFound             NOT_FOUND         no task with that id was enqueued here
    ├── RequestIdConflict        ALREADY_EXISTS    request_id reused with a different request
    ├── Unauthenticated          UNAUTHENTICATED   no or wrong credentials (one fixed message)
    ├── PermissionDenied         PERMISSION_DENIED the caller may not enqueue this task
    ├── LimitExceeded            RESOURCE_EXHAUSTED a limit was reached; the message names it
    │   └── RateLimited          RESOURCE_EXHAUSTED over the caller's rate; RetryInfo says when
    └── Unavailable              UNAVAILABLE       a dependency is down; retry with backoff
        ├── DatabaseUnavailable
        ├── BrokerUnavailable
        └── ShuttingDown

Anything else is a bug: the caller gets INTERNAL with a fixed message and the log gets the
traceback. ``RateLimited`` also carries a ``google.rpc.RetryInfo`` in the status details
(the ``grpc-status-details-bin`` trailer).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc import aio
from grpc_status import rpc_status

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"


class TaskgateError(Exception):
    """Base of every error the gateway raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(TaskgateError):
    """The request is malformed; the message says which field and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownTask(InvalidRequest):
    """The task name is not in the gateway's catalog."""


class ArgumentsDoNotBind(InvalidRequest):
    """The arguments do not fit the task's signature."""


class InvalidTasks(InvalidRequest):
    """Tasks of a batch are invalid: one ``(field, description)`` per task, by index."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        field, description = violations[0]
        more = len(violations) - 1
        suffix = f" (and {more} more invalid task{'s' if more > 1 else ''}; see the BadRequest details)"
        super().__init__(f"{field}: {description}" + (suffix if more else ""))
        self.violations = violations


class TaskNotFound(TaskgateError):
    """No task with this id was enqueued through the gateway."""

    code = grpc.StatusCode.NOT_FOUND


class RequestIdConflict(TaskgateError):
    """The request_id was used before with a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(TaskgateError):
    """The call carries no credentials, or wrong ones."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TaskgateError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class LimitExceeded(TaskgateError):
    """A server limit was reached (streams, stream lifetime); the message names it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(LimitExceeded):
    """The caller enqueues faster than its rate.

    Attributes:
        retry_after: Seconds until the next enqueue would be accepted.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(TaskgateError):
    """A dependency is unreachable; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DatabaseUnavailable(Unavailable):
    """PostgreSQL (or the configured database) cannot be reached."""


class BrokerUnavailable(Unavailable):
    """The Celery broker cannot be reached."""


class ShuttingDown(Unavailable):
    """The server is stopping; call again (another replica, or this one once restarted)."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a caller sees for ``exc``."""
    if isinstance(exc, TaskgateError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def status_details(exc: BaseException) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` (with details) to send for ``exc``; None when there are none."""
    detail = any_pb2.Any()
    if isinstance(exc, RateLimited):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, int(exc.retry_after * 1e9)))
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    elif isinstance(exc, InvalidTasks):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in exc.violations
        ]
        detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
    else:
        return None
    return status_pb2.Status(code=exc.code.value[0], message=str(exc), details=[detail])


F = TypeVar("F", bound=Callable[..., Any])


async def _abort(context: aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    details = status_details(exc)
    if details is not None:
        await context.abort_with_status(rpc_status.to_status(details))
    await context.abort(code, message)


def grpc_errors(method: F) -> F:
    """Decorate a servicer method (unary or server-streaming) with the error mapping.

    ``asyncio.CancelledError`` and gRPC's own abort pass through untouched.
    """
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the boundary
                await _abort(context, exc, name)

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            await _abort(context, exc, name)

    return cast(F, unary)
