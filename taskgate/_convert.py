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


def enqueue_request(
    task_name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    queue: str,
    request_id: str,
    priority: int | None,
    countdown: float | dt.timedelta | None,
    expire_time: dt.datetime | None,
    headers: Mapping[str, str] | None,
) -> pb.EnqueueRequest:
    """The EnqueueRequest for ``task_name(*args, **kwargs)``."""
    return pb.EnqueueRequest(
        task_name=task_name,
        args=to_list_value(args),
        kwargs=to_struct(kwargs),
        queue=queue,
        request_id=request_id,
        priority=priority,
        countdown=None if countdown is None else to_duration(countdown),
        expire_time=None if expire_time is None else to_timestamp(expire_time, "expire_time"),
        headers=headers,
    )


def enqueue_at_request(
    task_name: str,
    run_time: dt.datetime,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    queue: str,
    request_id: str,
    priority: int | None,
    expire_time: dt.datetime | None,
    headers: Mapping[str, str] | None,
) -> pb.EnqueueAtRequest:
    """The EnqueueAtRequest for ``task_name(*args, **kwargs)`` at ``run_time``."""
    return pb.EnqueueAtRequest(
        task_name=task_name,
        args=to_list_value(args),
        kwargs=to_struct(kwargs),
        queue=queue,
        request_id=request_id,
        priority=priority,
        run_time=to_timestamp(run_time, "run_time"),
        expire_time=None if expire_time is None else to_timestamp(expire_time, "expire_time"),
        headers=headers,
    )


@dataclasses.dataclass(frozen=True)
class TaskCall:
    """One task of an ``enqueue_batch``: ``task_name(*args, **kwargs)`` with its own options.

    ``countdown`` (seconds or a timedelta) and ``run_time`` (aware) are alternatives; neither
    means at once.
    """

    task_name: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    queue: str = ""
    priority: int | None = None
    countdown: float | dt.timedelta | None = None
    run_time: dt.datetime | None = None
    expire_time: dt.datetime | None = None
    headers: Mapping[str, str] | None = None


def batch_request(tasks: Sequence[TaskCall], request_id: str) -> pb.EnqueueBatchRequest:
    """The EnqueueBatchRequest for ``tasks``."""
    if any(t.countdown is not None and t.run_time is not None for t in tasks):
        raise ValueError("a TaskCall takes countdown or run_time, not both")
    return pb.EnqueueBatchRequest(
        tasks=[
            pb.BatchTask(
                task_name=t.task_name,
                args=to_list_value(t.args),
                kwargs=to_struct(t.kwargs),
                queue=t.queue,
                priority=t.priority,
                countdown=None if t.countdown is None else to_duration(t.countdown),
                run_time=None if t.run_time is None else to_timestamp(t.run_time, "run_time"),
                expire_time=None if t.expire_time is None else to_timestamp(t.expire_time, "expire_time"),
                headers=t.headers,
            )
            for t in tasks
        ],
        request_id=request_id,
    )


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
    )
