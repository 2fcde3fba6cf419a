"""The client's value types, and the conversions between them and the protobuf messages.

No I/O here. ``taskgate.client`` re-exports the public names; import them from there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from taskgate.v1 import task_service_pb2 as pb

#: Integers beyond this do not survive the trip as a JSON (double) number.
MAX_SAFE_INT = 2**53


class TaskState(enum.StrEnum):
    """Where a task is in its lifecycle. SUCCEEDED, FAILED and CANCELLED are terminal."""

    QUEUED = "QUEUED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    #: A workflow step waiting for the steps before it.
    WAITING = "WAITING"

    @property
    def terminal(self) -> bool:
        """True for the states a task never leaves."""
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """What a task last reported about how far it has come."""

    current: float
    #: 0 means the task did not say.
    total: float
    message: str
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class TaskErrorInfo:
    """The exception a task raised (while FAILED or RETRYING)."""

    type: str
    message: str
    #: Empty when the worker sent none.
    traceback: str


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """A snapshot of one task, as the gateway knows it. Times are aware UTC datetimes."""

    task_id: str
    task_name: str
    state: TaskState
    progress: Progress | None
    #: The return value when SUCCEEDED (None otherwise). Integral numbers are ints; values
    #: JSON has no type for (dates, UUIDs, decimals) arrive as strings.
    result: Any
    error: TaskErrorInfo | None
    retries: int
    #: Empty means the task's default route.
    queue: str
    create_time: dt.datetime | None
    run_time: dt.datetime | None
    start_time: dt.datetime | None
    end_time: dt.datetime | None
    update_time: dt.datetime | None = None
    #: The idempotency key given at enqueue time; empty when none was.
    request_id: str = ""
    #: True once a cancel was requested (``Client.cancel``).
    cancel_requested: bool = False
    #: The schedule that fired it; empty when none did.
    schedule_id: str = ""
    #: The workflow it is a step of; empty when none.
    workflow_id: str = ""
    #: Recorded from the result backend, not enqueued through the gateway.
    adopted: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of ``Client.list_tasks``."""

    tasks: list[Task]
    #: Pass it as ``page_token`` (with the same filter and order) for the next page; empty
    #: at the end.
    next_page_token: str


# --- Python to protobuf ------------------------------------------------------------------


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data; TypeError/ValueError for what would not survive the trip."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise ValueError(f"{where}: {value} is too large to send exactly as a number; pass a string")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a JSON number")
        return value
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: mapping keys must be str, got {type(key).__name__}")
            result[key] = _jsonable(item, f"{where}[{key!r}]")
        return result
    if isinstance(value, list | tuple):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"{where}: {type(value).__name__} cannot be sent as a task argument; "
        "use None, bool, int, float, str, lists/tuples and str-keyed mappings of them"
    )


def to_list_value(args: Sequence[Any]) -> struct_pb2.ListValue:
    """Positional task arguments as a ListValue."""
    values = struct_pb2.ListValue()
    values.extend(_jsonable(v, f"args[{i}]") for i, v in enumerate(args))
    return values


def to_struct(kwargs: Mapping[str, Any]) -> struct_pb2.Struct:
    """Keyword task arguments as a Struct."""
    return json_format.ParseDict(_jsonable(kwargs, "kwargs"), struct_pb2.Struct())


def to_timestamp(moment: dt.datetime, field: str) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp; a naive one is ValueError (its zone is a guess)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{field} must be timezone-aware, e.g. datetime.now(timezone.utc)")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def to_duration(delay: float | dt.timedelta) -> duration_pb2.Duration:
    """Seconds or a timedelta as a Duration."""
    duration = duration_pb2.Duration()
    duration.FromTimedelta(delay if isinstance(delay, dt.timedelta) else dt.timedelta(seconds=delay))
    return duration


@dataclasses.dataclass(frozen=True, slots=True)
class TaskCall:
    """One task to send: ``task_name(*args, **kwargs)`` and, apart from them, its options.

    The task's arguments are ``args`` and ``kwargs`` only; the options are keyword-only fields,
    so a task keyword argument named ``queue`` (or like any other option) goes in ``kwargs``.

    Attributes:
        task_name: the registered Celery task name.
        args: positional task arguments (a list or a tuple).
        kwargs: keyword task arguments.
        queue: the Celery queue; None means the task's default route.
        priority: 0 to 9 (0 is the highest on Redis); None means the queue's default.
        countdown: seconds (or a timedelta) to wait before the task may start.
        run_time: when the task may start (aware). ``countdown`` and ``run_time`` are
            alternatives; neither means at once.
        expire_time: after this (aware) time the task is discarded and ends CANCELLED.
        headers: extra Celery message headers.
        time_limit: seconds (or a timedelta) after which the worker kills the task (it ends
            FAILED with TimeLimitExceeded; Celery's prefork pool); None: the worker's default.
        soft_time_limit: seconds (or a timedelta) after which the task gets
            SoftTimeLimitExceeded; None: the worker's default.
    """

    task_name: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    _: dataclasses.KW_ONLY
    queue: str | None = None
    priority: int | None = None
    countdown: float | dt.timedelta | None = None
    run_time: dt.datetime | None = None
    expire_time: dt.datetime | None = None
    headers: Mapping[str, str] | None = None
    time_limit: float | dt.timedelta | None = None
    soft_time_limit: float | dt.timedelta | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.args, list | tuple):
            raise TypeError(f"args must be a list or a tuple, not {type(self.args).__name__}")
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping, not {type(self.kwargs).__name__}")
        if self.countdown is not None and self.run_time is not None:
            raise ValueError("a task takes countdown or run_time, not both")


def _common_fields(call: TaskCall) -> dict[str, Any]:
    """The fields every request message shares, from ``call``."""
    return {
        "task_name": call.task_name,
        "args": to_list_value(call.args),
        "kwargs": to_struct(call.kwargs),
        "queue": call.queue or "",
        "priority": call.priority,
        "expire_time": None if call.expire_time is None else to_timestamp(call.expire_time, "expire_time"),
        "headers": call.headers,
        "time_limit": None if call.time_limit is None else to_duration(call.time_limit),
        "soft_time_limit": None if call.soft_time_limit is None else to_duration(call.soft_time_limit),
    }


def enqueue_request(call: TaskCall, request_id: str | None) -> pb.EnqueueRequest:
    """The EnqueueRequest for ``call``, which must have no ``run_time``."""
    if call.run_time is not None:
        raise ValueError("a task with a run_time is sent with EnqueueAt")
    countdown = None if call.countdown is None else to_duration(call.countdown)
    return pb.EnqueueRequest(**_common_fields(call), countdown=countdown, request_id=request_id or "")


def enqueue_at_request(call: TaskCall, request_id: str | None) -> pb.EnqueueAtRequest:
    """The EnqueueAtRequest for ``call``, which must have a ``run_time``."""
    if call.run_time is None:
        raise ValueError("EnqueueAt needs a run_time")
    run_time = to_timestamp(call.run_time, "run_time")
    return pb.EnqueueAtRequest(**_common_fields(call), run_time=run_time, request_id=request_id or "")


def send_request(call: TaskCall, request_id: str | None) -> pb.EnqueueRequest | pb.EnqueueAtRequest:
    """EnqueueAt's request for a ``call`` with a run_time, Enqueue's otherwise."""
    if call.run_time is None:
        return enqueue_request(call, request_id)
    return enqueue_at_request(call, request_id)


def _batch_task(call: TaskCall) -> pb.BatchTask:
    return pb.BatchTask(
        **_common_fields(call),
        countdown=None if call.countdown is None else to_duration(call.countdown),
        run_time=None if call.run_time is None else to_timestamp(call.run_time, "run_time"),
    )


def batch_request(tasks: Sequence[TaskCall], request_id: str | None) -> pb.EnqueueBatchRequest:
    """The EnqueueBatchRequest for ``tasks``."""
    return pb.EnqueueBatchRequest(tasks=[_batch_task(t) for t in tasks], request_id=request_id or "")


# --- protobuf to Python ------------------------------------------------------------------


def _ints_back(value: Any) -> Any:
    """JSON numbers arrive as doubles; give integral ones back as ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_SAFE_INT:
        return int(value)
    if isinstance(value, list):
        return [_ints_back(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints_back(v) for k, v in value.items()}
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """A protobuf Value as Python, integral numbers as ints."""
    return _ints_back(json_format.MessageToDict(value))


def from_struct(value: struct_pb2.Struct) -> dict[str, Any]:
    """A protobuf Struct as a Python dict, integral numbers as ints."""
    result: dict[str, Any] = _ints_back(json_format.MessageToDict(value))
    return result


def _time(stamp: timestamp_pb2.Timestamp, present: bool) -> dt.datetime | None:
    return stamp.ToDatetime(tzinfo=dt.UTC) if present else None


def state_from_proto(state: pb.TaskState.ValueType) -> TaskState:
    """The proto enum value as a TaskState; ValueError for one this client does not know."""
    try:
        return TaskState(pb.TaskState.Name(state).removeprefix("TASK_STATE_"))
    except ValueError:
        raise ValueError(f"the server sent task state {int(state)}, unknown to this client") from None


def task_from_proto(message: pb.Task) -> Task:
    """A proto Task as a Task."""
    progress = None
    if message.HasField("progress"):
        progress = Progress(
            current=message.progress.current,
            total=message.progress.total,
            message=message.progress.message,
            details=from_struct(message.progress.details),
        )
    error = None
    if message.HasField("error"):
        error = TaskErrorInfo(
            type=message.error.type, message=message.error.message, traceback=message.error.traceback
        )
    return Task(
        task_id=message.task_id,
        task_name=message.task_name,
        state=state_from_proto(message.state),
        progress=progress,
        result=from_value(message.result) if message.HasField("result") else None,
        error=error,
        retries=message.retries,
        queue=message.queue,
        create_time=_time(message.create_time, message.HasField("create_time")),
        run_time=_time(message.run_time, message.HasField("run_time")),
        start_time=_time(message.start_time, message.HasField("start_time")),
        end_time=_time(message.end_time, message.HasField("end_time")),
        update_time=_time(message.update_time, message.HasField("update_time")),
        request_id=message.request_id,
        cancel_requested=message.cancel_requested,
        schedule_id=message.schedule_id,
        workflow_id=message.workflow_id,
        adopted=message.adopted,
    )
