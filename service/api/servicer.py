"""The TaskService servicer: identify the caller, apply limits, decode, call the use case, encode."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from grpc import aio

from service.api import control_convert, convert, listing
from service.api.auth import Authenticator
from service.api.limits import InputLimits, RateLimiter, ServiceLimits, StreamSlots
from service.api.status import code_for, grpc_errors
from service.domain.errors import InvalidRequest, TaskgateError, Unavailable
from service.domain.model import TaskSpec
from service.domain.query import TaskQuery
from service.usecases.control import Control
from service.usecases.tasks import Accepted, Gateway
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

Context = aio.ServicerContext[Any, Any]
R = TypeVar("R", pb.EnqueueRequest, pb.EnqueueAtRequest)

#: The enqueue decoders, with the time limits (``control_convert``).
_ENQUEUE_SPEC = control_convert.limited(convert.enqueue_spec)
_ENQUEUE_AT_SPEC = control_convert.limited(convert.enqueue_at_spec)

#: One line per Enqueue / EnqueueAt call: who, which task, the outcome. Never the arguments.
audit = logging.getLogger("taskgate.audit")


@dataclass(slots=True)
class _Audited:
    task_id: str = ""
    outcome: str = "INTERNAL"


@contextlib.contextmanager
def _audited(what: str, request_id: str, *, one_task: bool = True) -> Iterator[_Audited]:
    """Write one audit line for the call in the block, whatever its outcome.

    ``what`` says who asked for what; the block sets the task_id and outcome on success,
    errors set the outcome from their gRPC code.
    """
    audited = _Audited()
    try:
        yield audited
    except TaskgateError as exc:
        audited.outcome = code_for(exc).name
        raise
    except asyncio.CancelledError:
        audited.outcome = "CANCELLED"
        raise
    finally:
        task_id = f" task_id={audited.task_id or '-'}" if one_task else ""
        audit.info("%s%s request_id=%r outcome=%s", what, task_id, request_id, audited.outcome)


def _clip(text: str) -> str:
    return text if len(text) <= 255 else f"{text[:255]}…"


class TaskServicer(pb_grpc.TaskServiceServicer):
    """Implements taskgate.v1.TaskService on top of the Gateway."""

    def __init__(
        self,
        gateway: Gateway,
        authenticator: Authenticator | None = None,
        limits: ServiceLimits | None = None,
    ) -> None:
        self._gateway = gateway
        self._auth = authenticator or Authenticator.open()
        self._limits = limits or ServiceLimits()
        self._rate = RateLimiter()
        self._streams = StreamSlots(self._limits.max_streams_per_caller, self._limits.max_streams)

    @property
    def open_streams(self) -> int:
        """How many StreamProgress calls are open (for tests and metrics)."""
        return self._streams.open_count

    async def _enqueue(
        self, request: R, context: Context, decode: Callable[[R, InputLimits], TaskSpec]
    ) -> Accepted:
        caller = self._auth.caller_of(context)
        what = f"caller={caller.name!r} task_name={_clip(request.task_name)!r}"
        with _audited(what, _clip(request.request_id)) as audited:
            self._rate.check(caller)
            accepted = await self._gateway.enqueue(decode(request, self._limits.input), caller)
            audited.task_id = accepted.task_id
            audited.outcome = "deduplicated" if accepted.deduplicated else "accepted"
        return accepted

    @grpc_errors
    async def Enqueue(self, request: pb.EnqueueRequest, context: Context) -> pb.EnqueueResponse:  # noqa: N802
        accepted = await self._enqueue(request, context, _ENQUEUE_SPEC)
        return pb.EnqueueResponse(
            task_id=accepted.task_id,
            state=convert.state_to_proto(accepted.state),
            deduplicated=accepted.deduplicated,
        )

    @grpc_errors
    async def EnqueueAt(self, request: pb.EnqueueAtRequest, context: Context) -> pb.EnqueueAtResponse:  # noqa: N802
        accepted = await self._enqueue(request, context, _ENQUEUE_AT_SPEC)
        return pb.EnqueueAtResponse(
            task_id=accepted.task_id,
            state=convert.state_to_proto(accepted.state),
            deduplicated=accepted.deduplicated,
        )

    @grpc_errors
    async def EnqueueBatch(  # noqa: N802
        self, request: pb.EnqueueBatchRequest, context: Context
    ) -> pb.EnqueueBatchResponse:
        caller = self._auth.caller_of(context)
        count = len(request.tasks)
        what = f"caller={caller.name!r} batch of {count} tasks"
        with _audited(what, _clip(request.request_id), one_task=False) as audited:
            if not request.tasks:
                raise InvalidRequest("tasks is empty: a batch needs at least one task")
            if count > self._limits.max_batch:
                raise InvalidRequest(
                    f"the batch has {count} tasks; the limit is {self._limits.max_batch} (TASKGATE_MAX_BATCH)"
                )
            request_id = convert.batch_request_id(request)
            self._rate.check(caller, cost=count)
            specs = [
                functools.partial(
                    control_convert.batch_task_spec,
                    task,
                    f"{request_id}#{i}" if request_id else "",
                    self._limits.input,
                )
                for i, task in enumerate(request.tasks)
            ]
            accepted, repeated = await self._gateway.enqueue_batch(specs, caller, request_id=request_id)
            audited.outcome = "deduplicated" if repeated else "accepted"
        return pb.EnqueueBatchResponse(
            tasks=[
                pb.EnqueuedTask(task_id=a.task_id, state=convert.state_to_proto(a.state)) for a in accepted
            ],
            deduplicated=repeated,
        )

    @grpc_errors
    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.GetStatusResponse:  # noqa: N802
        caller = self._auth.caller_of(context)
        record = await self._gateway.get(convert.task_id_of(request), caller)
        return pb.GetStatusResponse(task=convert.task_to_proto(record))

    @grpc_errors
    async def StreamProgress(  # noqa: N802
        self, request: pb.StreamProgressRequest, context: Context
    ) -> AsyncIterator[pb.StreamProgressResponse]:
        """The gateway's watch (which ends with LimitExceeded once the stream lifetime is over).

        ``aclosing``: when grpc cancels the call (the client went away) the watch is closed
        at once, releasing its hub inbox.
        """
        caller = self._auth.caller_of(context)
        task_id = convert.task_id_of(request)
        with self._streams.hold(caller):
            watch = self._gateway.watch(task_id, caller, lifetime=self._limits.stream_lifetime)
            async with contextlib.aclosing(watch) as records:
                async for record in records:
                    yield pb.StreamProgressResponse(task=convert.task_to_proto(record))

    @property
    def _control(self) -> Control:
        control = self._gateway.control
        if control is None:
            raise Unavailable("cancel, list and wait are not wired in this server")
        return control

    @grpc_errors
    async def CancelTask(self, request: pb.CancelTaskRequest, context: Context) -> pb.CancelTaskResponse:  # noqa: N802
        caller = self._auth.caller_of(context)
        task_id = convert.task_id_of(pb.GetStatusRequest(task_id=request.task_id))
        reason = control_convert.reason_of(request)
        what = f"caller={caller.name!r} cancel terminate={request.terminate} reason={reason!r}"
        with _audited(what, "") as audited:
            audited.task_id = task_id
            record = await self._control.cancel(task_id, caller, terminate=request.terminate, reason=reason)
            audited.outcome = f"cancel_{record.state.value.lower()}"
        return pb.CancelTaskResponse(task=convert.task_to_proto(record))

    @grpc_errors
    async def ListTasks(self, request: pb.ListTasksRequest, context: Context) -> pb.ListTasksResponse:  # noqa: N802
        caller = self._auth.caller_of(context)
        newest_first = listing.parse_order_by(request.order_by)
        query = TaskQuery(
            filter=listing.parse_filter(request.filter),
            newest_first=newest_first,
            limit=listing.page_size(request.page_size),
            after=listing.decode_page_token(request.page_token, request.filter, newest_first),
        )
        page = await self._control.list_tasks(query, caller)
        token = ""
        if page.next_key is not None:
            token = listing.encode_page_token(page.next_key, request.filter, newest_first)
        return pb.ListTasksResponse(
            tasks=[convert.task_to_proto(record) for record in page.tasks], next_page_token=token
        )

    @grpc_errors
    async def WaitTask(self, request: pb.WaitTaskRequest, context: Context) -> pb.WaitTaskResponse:  # noqa: N802
        caller = self._auth.caller_of(context)
        task_id = convert.task_id_of(pb.GetStatusRequest(task_id=request.task_id))
        timeout = control_convert.wait_timeout(request)
        with self._streams.hold(caller):  # a wait holds a subscription inbox, as a stream does
            record = await self._control.wait(
                task_id, caller, timeout=timeout, lifetime=self._limits.stream_lifetime
            )
        return pb.WaitTaskResponse(task=convert.task_to_proto(record))
