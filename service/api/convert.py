"""Protobuf messages to domain objects and back. No I/O here."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from service.api.limits import InputLimits
from service.domain.errors import InvalidRequest
from service.domain.model import Progress, TaskRecord, TaskSpec, TaskState
from taskgate.v1 import task_service_pb2 as pb

MAX_NAME_LENGTH = 255
#: task_name and queue: Celery names, nothing that could smuggle anything into a log or a key.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]*$")
#: request_id: printable ASCII.
_PRINTABLE_RE = re.compile(r"^[\x20-\x7e]*$")
DEFAULT_LIMITS = InputLimits()
#: Seconds; beyond this a run time would overflow a datetime (the server's maximum is far lower).
MAX_COUNTDOWN = 1000 * 365 * 86400.0
_MAX_SAFE_INT = 2**53


_TaskRequest = pb.EnqueueRequest | pb.EnqueueAtRequest | pb.BatchTask


# --- times ---------------------------------------------------------------------------


def to_datetime(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    """A Timestamp as an aware UTC datetime."""
    return ts.ToDatetime(tzinfo=dt.UTC)


def _time_field(name: str, ts: timestamp_pb2.Timestamp) -> dt.datetime:
    """A request's Timestamp field; out-of-range seconds or nanos are InvalidRequest."""
    try:
        return to_datetime(ts)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} is not a valid timestamp (years 1 to 9999)") from None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_timestamp(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp (exact integer arithmetic; ``FromDatetime`` goes
    through ``calendar.timegm`` and costs several times more, five times per snapshot)."""
    delta = moment - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


# --- free-form values ------------------------------------------------------------------


_NO_LIMITS_DEPTH = 10_000


def from_list_value(value: struct_pb2.ListValue, max_depth: int = _NO_LIMITS_DEPTH) -> list[Any]:
    """A ListValue as a Python list, integral numbers as ints.

    Raises:
        InvalidRequest: nested deeper than ``max_depth`` (the list itself is depth 1), or
            holding NaN or Infinity.
    """
    return [_python(v, 1, max_depth) for v in value.values]


def from_struct(value: struct_pb2.Struct, max_depth: int = _NO_LIMITS_DEPTH) -> dict[str, Any]:
    """A Struct as a Python dict, integral numbers as ints (errors as for ``from_list_value``)."""
    return {_no_nul(k): _python(v, 1, max_depth) for k, v in value.fields.items()}


def _python(value: struct_pb2.Value, depth: int, max_depth: int) -> Any:
    """One Value inside a container at ``depth``, as Python (a hand-written MessageToDict:
    several times faster, and it checks the limits on the same walk)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return _no_nul(value.string_value)
    if kind == "number_value":
        number = value.number_value
        if number.is_integer():
            return int(number) if abs(number) <= _MAX_SAFE_INT else number
        if not math.isfinite(number):
            raise InvalidRequest("args and kwargs may not contain NaN or Infinity (JSON has neither)")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        if depth >= max_depth:
            raise _too_deep(max_depth)
        return {_no_nul(k): _python(v, depth + 1, max_depth) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        if depth >= max_depth:
            raise _too_deep(max_depth)
        return [_python(v, depth + 1, max_depth) for v in value.list_value.values]
    return None


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise InvalidRequest("args, kwargs and headers may not contain the NUL character (U+0000)")
    return text


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(
        f"args or kwargs are nested deeper than {max_depth} levels (TASKGATE_MAX_ARGS_DEPTH)"
    )


def jsonable(value: Any) -> Any:
    """``value`` with everything JSON has no type for turned into strings or lists."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    return repr(value)


def to_value(value: Any) -> struct_pb2.Value:
    """Any Python value as a protobuf Value (see ``jsonable``)."""
    message = struct_pb2.Value()
    _fill_value(message, jsonable(value))
    return message


def to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A mapping as a protobuf Struct (see ``jsonable``)."""
    message = struct_pb2.Struct()
    for key, item in jsonable(value).items():
        _fill_value(message.fields[key], item)
    return message


def _fill_value(target: struct_pb2.Value, value: Any) -> None:
    """Set ``target`` to an already ``jsonable`` value (a hand-written ``ParseDict``, several
    times faster: every streamed progress update goes through here)."""
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif value is True or value is False:
        target.bool_value = value
    elif isinstance(value, int | float):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, dict):
        fields = target.struct_value.fields
        target.struct_value.SetInParent()
        for key, item in value.items():
            _fill_value(fields[key], item)
    else:
        values = target.list_value.values
        target.list_value.SetInParent()
        for item in value:
            _fill_value(values.add(), item)


# --- requests ---------------------------------------------------------------------------


def _check_name(field: str, value: str, *, required: bool, pattern: re.Pattern[str] = _NAME_RE) -> str:
    if required and not value:
        raise InvalidRequest(f"{field} is required")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"{field} is longer than {MAX_NAME_LENGTH} characters")
    if not pattern.fullmatch(value):
        allowed = "letters, digits and _ . : -" if pattern is _NAME_RE else "printable ASCII"
        raise InvalidRequest(f"{field} may contain only {allowed}")
    return value


def _check_size(request: _TaskRequest, limits: InputLimits) -> None:
    """Refuse args / kwargs over the size limit (before decoding them)."""
    size = request.args.ByteSize() + request.kwargs.ByteSize()
    if size > limits.max_args_bytes:
        raise InvalidRequest(
            f"args and kwargs are {size} bytes serialized; "
            f"the limit is {limits.max_args_bytes} (TASKGATE_MAX_ARGS_BYTES)"
        )


#: Celery's own protocol headers: a caller must not override them (``task`` would bypass
#: the catalog, ``id`` would detach the run from its record).
RESERVED_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
        "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
        "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps",
    }
)  # fmt: skip


def _check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    if not headers:
        return {}
    for name, text in headers.items():
        _no_nul(name)
        _no_nul(text)
    reserved = sorted(name for name in headers if name.lower() in RESERVED_HEADERS)
    if reserved:
        raise InvalidRequest(f"headers may not set Celery's own headers: {', '.join(reserved)}")
    return dict(headers)


def _common_fields(request: _TaskRequest, limits: InputLimits) -> dict[str, Any]:
    task_name = _check_name("task_name", request.task_name, required=True)
    _check_size(request, limits)
    priority: int | None = None
    if request.HasField("priority"):
        priority = request.priority
        if not 0 <= priority <= 9:
            raise InvalidRequest(f"priority must be between 0 and 9, got {priority}")
    expire_time = _time_field("expire_time", request.expire_time) if request.HasField("expire_time") else None
    return {
        "task_name": task_name,
        "args": from_list_value(request.args, limits.max_args_depth),
        "kwargs": from_struct(request.kwargs, limits.max_args_depth),
        "queue": _check_name("queue", request.queue, required=False) if request.queue else "",
        "priority": priority,
        "expire_time": expire_time,
        "headers": _check_headers(request.headers),
    }


def _request_id(value: str, max_length: int = MAX_NAME_LENGTH) -> str:
    if len(value) > max_length:
        raise InvalidRequest(f"request_id is longer than {max_length} characters")
    return _check_name("request_id", value, required=False, pattern=_PRINTABLE_RE)


def _countdown(request: pb.EnqueueRequest | pb.BatchTask) -> float | None:
    if not request.HasField("countdown"):
        return None
    try:
        countdown = request.countdown.ToTimedelta().total_seconds()
    except (ValueError, OverflowError):
        raise InvalidRequest("countdown is not a valid duration") from None
    if countdown < 0:
        raise InvalidRequest("countdown must not be negative")
    if countdown > MAX_COUNTDOWN:
        raise InvalidRequest("countdown is longer than 1000 years")
    return countdown


def _check_expiry(spec: TaskSpec) -> TaskSpec:
    if spec.expire_time is not None and spec.run_time is not None and spec.expire_time <= spec.run_time:
        raise InvalidRequest("expire_time must be after run_time")
    return spec


def enqueue_spec(request: pb.EnqueueRequest, limits: InputLimits = DEFAULT_LIMITS) -> TaskSpec:
    """Decode an EnqueueRequest; InvalidRequest names the field (or the limit) that is wrong."""
    return TaskSpec(
        countdown=_countdown(request),
        request_id=_request_id(request.request_id),
        **_common_fields(request, limits),
    )


def enqueue_at_spec(request: pb.EnqueueAtRequest, limits: InputLimits = DEFAULT_LIMITS) -> TaskSpec:
    """Decode an EnqueueAtRequest; a missing run_time is InvalidRequest."""
    if not request.HasField("run_time"):
        raise InvalidRequest("run_time is required for EnqueueAt (use Enqueue to run at once)")
    return _check_expiry(
        TaskSpec(
            run_time=_time_field("run_time", request.run_time),
            request_id=_request_id(request.request_id),
            **_common_fields(request, limits),
        )
    )


#: Longest batch request_id: "#<index>" is appended for each task's own request_id.
MAX_BATCH_REQUEST_ID = 240


def batch_request_id(request: pb.EnqueueBatchRequest) -> str:
    """The batch's request_id, checked."""
    return _request_id(request.request_id, MAX_BATCH_REQUEST_ID)


def batch_task_spec(task: pb.BatchTask, request_id: str, limits: InputLimits = DEFAULT_LIMITS) -> TaskSpec:
    """Decode one task of a batch; ``request_id`` is the task's own (derived from the batch's)."""
    run_time = _time_field("run_time", task.run_time) if task.HasField("run_time") else None
    return _check_expiry(
        TaskSpec(
            countdown=_countdown(task),
            run_time=run_time,
            request_id=request_id,
            **_common_fields(task, limits),
        )
    )


def task_id_of(request: pb.GetStatusRequest | pb.StreamProgressRequest) -> str:
    """The task id a request names; an empty one is InvalidRequest."""
    if not request.task_id:
        raise InvalidRequest("task_id is required")
    return _check_name("task_id", request.task_id, required=True, pattern=_PRINTABLE_RE)


# --- responses --------------------------------------------------------------------------


def state_to_proto(state: TaskState) -> pb.TaskState.ValueType:
    """A domain state as the proto enum value."""
    return pb.TaskState.Value(f"TASK_STATE_{state.value}")


def _progress_to_proto(progress: Progress) -> pb.Progress:
    return pb.Progress(
        current=progress.current,
        total=progress.total,
        message=progress.message,
        details=to_struct(progress.details),
    )


def task_to_proto(record: TaskRecord) -> pb.Task:
    """A task record as the proto Task."""
    task = pb.Task(
        task_id=record.task_id,
        task_name=record.task_name,
        state=state_to_proto(record.state),
        retries=record.retries,
        queue=record.queue,
        request_id=record.request_id,
        create_time=to_timestamp(record.create_time),
        run_time=to_timestamp(record.run_time),
        update_time=to_timestamp(record.update_time),
        cancel_requested=record.cancel_requested,
        schedule_id=record.schedule_id,
        workflow_id=record.workflow_id,
        adopted=record.adopted,
    )
    if record.progress is not None:
        task.progress.CopyFrom(_progress_to_proto(record.progress))
    if record.state is TaskState.SUCCEEDED:
        task.result.CopyFrom(to_value(record.result))
    if record.error is not None:
        task.error.CopyFrom(pb.TaskError(**dataclasses.asdict(record.error)))
    if record.start_time is not None:
        task.start_time.CopyFrom(to_timestamp(record.start_time))
    if record.end_time is not None:
        task.end_time.CopyFrom(to_timestamp(record.end_time))
    return task
