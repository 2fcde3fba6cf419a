"""Protobuf ⇄ domain for the control calls and the time limits. No I/O here.

Kept apart from ``convert.py``: it wraps that module's decoders (time limits) and encoder
(``cancel_requested``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from google.protobuf import duration_pb2

from service.api import convert
from service.api.limits import InputLimits
from service.domain.errors import InvalidRequest
from service.domain.model import TaskSpec
from taskgate.v1 import task_service_pb2 as pb

MAX_REASON_LENGTH = 255
#: Seconds: a week; longer limits are refused (Celery keeps them as timers in the worker).
MAX_TIME_LIMIT = 7 * 86400.0

_Limited = pb.EnqueueRequest | pb.EnqueueAtRequest | pb.BatchTask
R = TypeVar("R", pb.EnqueueRequest, pb.EnqueueAtRequest)


def seconds_of(name: str, value: duration_pb2.Duration, *, maximum: float) -> float:
    """A Duration in seconds.

    Raises:
        InvalidRequest: negative, or nanos out of range, or longer than ``maximum``.
    """
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidRequest(f"{name} must not be negative")
    if value.nanos >= 1_000_000_000:
        raise InvalidRequest(f"{name} is not a valid duration")
    seconds = value.seconds + value.nanos / 1e9
    if seconds > maximum:
        raise InvalidRequest(f"{name} is longer than {maximum:g} seconds")
    return seconds


def time_limits(request: _Limited) -> tuple[float | None, float | None]:
    """``(time_limit, soft_time_limit)`` in seconds; None where absent or zero.

    Raises:
        InvalidRequest: a negative limit, or a soft limit longer than the hard one.
    """
    hard = soft = None
    if request.HasField("time_limit"):
        hard = seconds_of("time_limit", request.time_limit, maximum=MAX_TIME_LIMIT) or None
    if request.HasField("soft_time_limit"):
        soft = seconds_of("soft_time_limit", request.soft_time_limit, maximum=MAX_TIME_LIMIT) or None
    if hard is not None and soft is not None and soft > hard:
        raise InvalidRequest("soft_time_limit must not be longer than time_limit")
    return hard, soft


def _with_limits(spec: TaskSpec, request: _Limited) -> TaskSpec:
    hard, soft = time_limits(request)
    if hard is None and soft is None:
        return spec
    return dataclasses.replace(spec, time_limit=hard, soft_time_limit=soft)


def limited(decode: Callable[[R, InputLimits], TaskSpec]) -> Callable[[R, InputLimits], TaskSpec]:
    """``decode`` (``convert.enqueue_spec`` or ``enqueue_at_spec``) with the time limits."""

    def decode_limited(request: R, limits: InputLimits) -> TaskSpec:
        return _with_limits(decode(request, limits), request)

    return decode_limited


def batch_task_spec(task: pb.BatchTask, request_id: str, limits: InputLimits) -> TaskSpec:
    """``convert.batch_task_spec`` with the time limits."""
    return _with_limits(convert.batch_task_spec(task, request_id, limits), task)


def reason_of(request: pb.CancelTaskRequest) -> str:
    """The cancel reason, checked (printable, at most 255 characters).

    Raises:
        InvalidRequest: too long, or holding control characters.
    """
    reason = request.reason
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidRequest(f"reason is longer than {MAX_REASON_LENGTH} characters")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in reason):
        raise InvalidRequest("reason may not contain control characters")
    return reason


def wait_timeout(request: pb.WaitTaskRequest) -> float | None:
    """WaitTask's timeout in seconds; None for the default.

    Raises:
        InvalidRequest: a negative or malformed timeout.
    """
    if not request.HasField("timeout"):
        return None
    return seconds_of("timeout", request.timeout, maximum=float("inf")) or None
