"""The one boundary that turns the gateway's errors into gRPC statuses.

Every servicer method is wrapped by :func:`grpc_errors`. A :class:`TaskgateError` becomes
the status of :data:`CODES` (the nearest class in its MRO) with its own message; anything
else is a bug: the caller gets INTERNAL with a fixed message and the log gets the
traceback. ``RateLimited`` also carries a ``google.rpc.RetryInfo`` and ``InvalidTasks`` a
``google.rpc.BadRequest`` in the status details (the ``grpc-status-details-bin`` trailer).
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

from service.api import metrics
from service.domain.errors import (
    InvalidRequest,
    InvalidTasks,
    LimitExceeded,
    PermissionDenied,
    RateLimited,
    RequestIdConflict,
    TaskgateError,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
)
from service.runtime import tracing

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"

#: The status code of each error class; a subclass takes its nearest ancestor's.
CODES: dict[type[TaskgateError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TaskNotFound: grpc.StatusCode.NOT_FOUND,
    RequestIdConflict: grpc.StatusCode.ALREADY_EXISTS,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a caller sees for ``exc``."""
    for klass in type(exc).__mro__:
        code = CODES.get(klass)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a caller sees for ``exc``."""
    if isinstance(exc, TaskgateError):
        return code_for(exc), str(exc)
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
    return status_pb2.Status(code=code_for(exc).value[0], message=str(exc), details=[detail])


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


async def _measured(call: metrics.Call, method: Any, servicer: Any, request: Any, context: Any) -> Any:
    """A unary call with metrics on: the same boundary, counted with its status code."""
    code = "OK"
    try:
        return await method(servicer, request, context)
    except aio.AbortError:
        code = metrics.code_of(context)
        raise
    except Exception as exc:  # noqa: BLE001 - this is the boundary
        code = code_for(exc).name
        await _abort(context, exc, method.__name__)
    except BaseException:
        code = "CANCELLED"
        raise
    finally:
        call.done(code)


def grpc_errors(method: F) -> F:
    """Decorate a servicer method (unary or server-streaming) with the error mapping.

    ``asyncio.CancelledError`` and gRPC's own abort pass through untouched. With metrics on
    (``service.api.metrics``) every call is counted with its status code; with tracing on
    (``service.runtime.tracing``) every call is a SERVER span continuing the caller's trace.
    """
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            rpc = metrics.current
            call = None if rpc is None else rpc.start(self, name, "server_stream")
            code = "OK"
            service = "" if tracing.tracer is None else metrics.service_name(type(self))
            try:
                with tracing.server_span(service, name, context):
                    async for item in method(self, request, context):
                        if call is not None:
                            call.sent()
                        yield item
            except aio.AbortError:
                code = metrics.code_of(context)
                raise
            except Exception as exc:  # noqa: BLE001 - this is the boundary
                code = code_for(exc).name
                await _abort(context, exc, name)
            except BaseException:
                code = "CANCELLED"
                raise
            finally:
                if call is not None:
                    call.done(code)

        return cast(F, stream)

    @functools.wraps(method)
    async def traced(self: Any, request: Any, context: Any) -> Any:
        if tracing.tracer is None:
            return await unary(self, request, context)
        with tracing.server_span(metrics.service_name(type(self)), name, context):
            return await unary(self, request, context)

    async def unary(self: Any, request: Any, context: Any) -> Any:
        rpc = metrics.current
        if rpc is not None:
            return await _measured(rpc.start(self, name, "unary"), method, self, request, context)
        try:
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            await _abort(context, exc, name)

    return cast(F, traced)
