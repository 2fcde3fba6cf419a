"""ScheduleService messages ⇄ domain schedules. No I/O here.

The task template is decoded with the same checks as an Enqueue request (names, sizes,
depth, NUL, Celery's reserved headers, priority, time limits); the catalog and permission
checks follow in the use case.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re

from google.protobuf import duration_pb2

from service.api import control_convert, convert, listing
from service.api.limits import InputLimits
from service.domain.errors import InvalidRequest
from service.domain.schedule import DEFAULT_CATCHUP, OverlapPolicy, Schedule, TaskTemplate, check_schedule_id
from service.usecases.schedules import WRITABLE, Draft
from taskgate.v1 import schedule_service_pb2 as spb
from taskgate.v1 import task_service_pb2 as pb

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,255}$")
#: Longest interval or catch-up window, seconds (ten years).
MAX_SPAN = 10 * 366 * 86400.0
_POLICIES = {
    spb.OVERLAP_POLICY_UNSPECIFIED: OverlapPolicy.SKIP,
    spb.OVERLAP_POLICY_SKIP: OverlapPolicy.SKIP,
    spb.OVERLAP_POLICY_ALLOW: OverlapPolicy.ALLOW,
}
_POLICY_PROTO = {OverlapPolicy.SKIP: spb.OVERLAP_POLICY_SKIP, OverlapPolicy.ALLOW: spb.OVERLAP_POLICY_ALLOW}


def _name(field: str, value: str, *, required: bool) -> str:
    if required and not value:
        raise InvalidRequest(f"{field} is required")
    if not _NAME_RE.fullmatch(value):
        raise InvalidRequest(f"{field} must be at most 255 letters, digits and _ . : -; got {value[:80]!r}")
    return value


def _span(field: str, value: duration_pb2.Duration) -> dt.timedelta:
    return dt.timedelta(seconds=control_convert.seconds_of(field, value, maximum=MAX_SPAN))


def template_of(message: pb.TaskTemplate, limits: InputLimits) -> TaskTemplate:
    """A TaskTemplate, checked in form (InvalidRequest names the ``schedule.task.*`` field)."""
    size = message.args.ByteSize() + message.kwargs.ByteSize()
    if size > limits.max_args_bytes:
        raise InvalidRequest(
            f"schedule.task args and kwargs are {size} bytes serialized; "
            f"the limit is {limits.max_args_bytes} (TASKGATE_MAX_ARGS_BYTES)"
        )
    priority = message.priority if message.HasField("priority") else None
    if priority is not None and not 0 <= priority <= 9:
        raise InvalidRequest(f"schedule.task.priority must be between 0 and 9, got {priority}")
    reserved = sorted(name for name in message.headers if name.lower() in convert.RESERVED_HEADERS)
    if reserved:
        raise InvalidRequest(f"schedule.task.headers may not set Celery's own headers: {', '.join(reserved)}")
    if any("\x00" in text for item in message.headers.items() for text in item):
        raise InvalidRequest("schedule.task.headers may not contain the NUL character (U+0000)")
    hard, soft = control_convert.time_limits(message)  # type: ignore[arg-type]  # same fields
    expire = None
    if message.HasField("expire_after"):
        expire = control_convert.seconds_of(
            "schedule.task.expire_after", message.expire_after, maximum=MAX_SPAN
        )
    return TaskTemplate(
        task_name=_name("schedule.task.task_name", message.task_name, required=True),
        args=convert.from_list_value(message.args, limits.max_args_depth),
        kwargs=convert.from_struct(message.kwargs, limits.max_args_depth),
        queue=_name("schedule.task.queue", message.queue, required=False),
        priority=priority,
        headers=dict(message.headers),
        time_limit=hard,
        soft_time_limit=soft,
        expire_after=expire or None,
    )


def draft_of(message: spb.Schedule, limits: InputLimits, *, with_task: bool = True) -> Draft:
    """A Schedule message as a Draft (checked in form; the spec is checked by the domain)."""
    check_schedule_id(message.schedule_id, "schedule.schedule_id")
    kind = message.WhichOneof("spec")
    interval = _span("schedule.interval", message.interval) if kind == "interval" else None
    if kind == "cron" and not message.cron.strip():
        raise InvalidRequest("schedule.cron is empty: give a cron expression or an interval")
    catchup = (
        _span("schedule.catchup_window", message.catchup_window)
        if message.HasField("catchup_window")
        else None
    )
    task = template_of(message.task, limits) if with_task and message.HasField("task") else None
    if message.overlap_policy not in _POLICIES:
        raise InvalidRequest(f"schedule.overlap_policy {message.overlap_policy} is not a known OverlapPolicy")
    return Draft(
        schedule_id=message.schedule_id,
        cron=message.cron if kind == "cron" else "",
        interval=interval,
        time_zone=message.time_zone,
        task=task,
        paused=message.paused,
        overlap_policy=_POLICIES[message.overlap_policy],
        catchup_window=DEFAULT_CATCHUP if catchup is None else catchup,
    )


def mask_of(request: spb.UpdateScheduleRequest) -> frozenset[str]:
    """The fields an UpdateSchedule changes: every writable one for an empty mask or ``*``."""
    paths = list(request.update_mask.paths)
    if not paths or paths == ["*"]:
        return WRITABLE
    if "*" in paths:
        raise InvalidRequest("update_mask: '*' must be the only path")
    return frozenset(path.removeprefix("schedule.") for path in paths)


def schedule_to_proto(schedule: Schedule) -> spb.Schedule:
    """A schedule as the proto message."""
    timing, task = schedule.timing, schedule.task
    message = spb.Schedule(
        schedule_id=schedule.schedule_id,
        time_zone=timing.time_zone,
        paused=schedule.paused,
        overlap_policy=_POLICY_PROTO[schedule.overlap_policy],
        last_task_id=schedule.last_task_id,
        skipped_count=schedule.skipped_count,
        create_time=convert.to_timestamp(schedule.create_time),
        update_time=convert.to_timestamp(schedule.update_time),
        task=pb.TaskTemplate(
            task_name=task.task_name,
            args=convert.to_value(task.args).list_value,
            kwargs=convert.to_struct(task.kwargs),
            queue=task.queue,
            priority=task.priority,
            headers=task.headers,
        ),
    )
    if timing.interval is not None:
        message.interval.FromTimedelta(timing.interval)
    else:
        message.cron = timing.cron
    message.catchup_window.FromTimedelta(schedule.catchup_window)
    for name, seconds in (
        ("time_limit", task.time_limit),
        ("soft_time_limit", task.soft_time_limit),
        ("expire_after", task.expire_after),
    ):
        if seconds is not None:
            getattr(message.task, name).FromTimedelta(dt.timedelta(seconds=seconds))
    for name, moment in (
        ("next_run_time", schedule.next_run_time),
        ("last_run_time", schedule.last_run_time),
    ):
        if moment is not None:
            getattr(message, name).CopyFrom(convert.to_timestamp(moment))
    return message


def page_size(value: int) -> int:
    """ListSchedules' page size (as ListTasks': 0 is 50, at most 1,000)."""
    return listing.page_size(value)


def encode_page_token(after: str) -> str:
    """An opaque token for the page after schedule ``after``."""
    return base64.urlsafe_b64encode(f"s1:{after}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    """The schedule_id a page token continues after ("" for an empty token).

    Raises:
        InvalidRequest: a malformed token.
    """
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("s1:"):
        raise InvalidRequest(
            "page_token is not a token ListSchedules returned; start again with an empty one"
        )
    return text[3:]
