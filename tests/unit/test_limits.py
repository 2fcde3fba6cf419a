"""Rate buckets, stream slots, input limits and the RetryInfo status details."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2

from service.api import convert
from service.api.limits import InputLimits, RateLimiter, StreamSlots
from service.api.status import status_details
from service.domain.callers import Caller
from service.domain.errors import InvalidRequest, LimitExceeded, RateLimited
from taskgate.v1 import task_service_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    caller = Caller("c", rate=2)
    limiter.check(caller)
    limiter.check(caller)  # burst = 2
    with pytest.raises(RateLimited) as caught:
        limiter.check(caller)
    assert caught.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    limiter.check(caller)
    limiter.check(Caller("unlimited"))
    slow = Caller("slow", rate=0.25)  # burst max(1, rate) = 1, one token per 4 s
    limiter.check(slow)
    with pytest.raises(RateLimited) as caught:
        limiter.check(slow)
    assert caught.value.retry_after == pytest.approx(4.0)


def test_rate_limited_carries_retry_info() -> None:
    details = status_details(RateLimited("slow down", 1.5))
    assert details is not None and details.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.RetryInfo()
    assert details.details[0].Unpack(info)
    assert info.retry_delay.ToTimedelta().total_seconds() == pytest.approx(1.5)
    assert status_details(InvalidRequest("x")) is None


def test_stream_slots() -> None:
    slots = StreamSlots(per_caller=2, total=3)
    a, b = Caller("a"), Caller("b")
    with slots.hold(a), slots.hold(a):
        with pytest.raises(LimitExceeded, match="per caller"), slots.hold(a):
            pass
        with slots.hold(b):
            assert slots.open_count == 3
            with pytest.raises(LimitExceeded, match="per server"), slots.hold(Caller("c")):
                pass
    assert slots.open_count == 0
    anonymous = StreamSlots(per_caller=1, total=10)
    with anonymous.hold(Caller("")), anonymous.hold(Caller("")):  # open mode: only the total applies
        assert anonymous.open_count == 2


def request(**fields: Any) -> pb.EnqueueRequest:
    return pb.EnqueueRequest(**{"task_name": "demo.add", **fields})


def nested(depth: int) -> struct_pb2.ListValue:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return json_format.ParseDict(value, struct_pb2.ListValue())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task_name": "demo.add\n"}, "task_name may contain only"),
        ({"task_name": "démo.add"}, "task_name may contain only"),
        ({"queue": "a b"}, "queue may contain only"),
        ({"request_id": "id\x00"}, "request_id may contain only printable ASCII"),
        ({"request_id": "ïd"}, "request_id may contain only printable ASCII"),
        ({"args": nested(33)}, "TASKGATE_MAX_ARGS_DEPTH"),
        ({"args": json_format.ParseDict(["x" * 300_000], struct_pb2.ListValue())}, "TASKGATE_MAX_ARGS_BYTES"),
    ],
)
def test_input_limits(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        convert.enqueue_spec(request(**fields))


def test_input_limits_are_configurable() -> None:
    assert convert.enqueue_spec(request(args=nested(32))).args
    with pytest.raises(InvalidRequest, match="TASKGATE_MAX_ARGS_DEPTH"):
        convert.enqueue_spec(request(args=nested(3)), InputLimits(max_args_depth=2))
    big = json_format.ParseDict(["x" * 2000], struct_pb2.ListValue())
    with pytest.raises(InvalidRequest, match="TASKGATE_MAX_ARGS_BYTES"):
        convert.enqueue_spec(request(args=big), InputLimits(max_args_bytes=1000))


def test_hostile_numbers_and_times_are_invalid_not_internal() -> None:
    nan = request()
    nan.args.extend([float("nan")])
    with pytest.raises(InvalidRequest, match="NaN"):
        convert.enqueue_spec(nan)
    inf = request()
    inf.kwargs.update({"x": {"y": float("inf")}})
    with pytest.raises(InvalidRequest, match="Infinity"):
        convert.enqueue_spec(inf)
    huge = request()
    huge.countdown.seconds = 2**62
    with pytest.raises(InvalidRequest, match="countdown"):
        convert.enqueue_spec(huge)
    too_far = request()
    too_far.countdown.seconds = 300_000_000_000
    with pytest.raises(InvalidRequest, match="countdown"):
        convert.enqueue_spec(too_far)
    bad_time = request()
    bad_time.expire_time.nanos = -1
    with pytest.raises(InvalidRequest, match="expire_time"):
        convert.enqueue_spec(bad_time)
    at = pb.EnqueueAtRequest(task_name="demo.add")
    at.run_time.seconds = -(2**62)
    with pytest.raises(InvalidRequest, match="run_time"):
        convert.enqueue_at_spec(at)
    for task_id in ("\x00", "é", "x" * 256):
        with pytest.raises(InvalidRequest, match="task_id"):
            convert.task_id_of(pb.GetStatusRequest(task_id=task_id))
