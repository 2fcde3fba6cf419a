"""Hypothesis against the live server: well-formed but hostile messages, and raw bytes.

The server runs on the test's event loop; the property runs in a worker thread
(``asyncio.to_thread``) with a blocking channel, so the loop stays free to serve it and the
test can look inside the process afterwards: hub inboxes, Redis connections, the DB pool.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, message, struct_pb2, timestamp_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import Runtime
from service.results.hub import CLIENT_NAME
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import enqueue, wait_state

EXAMPLES = int(os.environ.get("TASKGATE_FUZZ_EXAMPLES", "10000"))
CALL_TIMEOUT = 10.0
#: Cases per hypothesis example, sent concurrently (so EXAMPLES // BATCH examples).
BATCH = 5
#: The hub's Redis connections at most: its subscription plus its read pool (max_connections=4).
HUB_CONNECTIONS = 1 + 4
#: What a well-formed request may get back from an open-mode server.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}
SERVICE = "/taskgate.v1.TaskService/"
METHODS: dict[str, tuple[type[message.Message], bool]] = {
    "Enqueue": (pb.EnqueueRequest, False),
    "EnqueueAt": (pb.EnqueueAtRequest, False),
    "GetStatus": (pb.GetStatusRequest, False),
    "StreamProgress": (pb.StreamProgressRequest, True),
}

# --- strategies ----------------------------------------------------------------------------

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**62), 2**62)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


#: Flat or one level deep (st.recursive is slow), or a deep tower of lists (the depth limit).
json_values = (
    leaves
    | st.lists(leaves, max_size=3)
    | st.dictionaries(st.text(max_size=4), leaves, max_size=2)
    | st.integers(25, 45).map(nested)
)
small = st.integers(-1000, 1000)
#: Two numbers (demo.add binds them and runs), or anything.
arguments = st.tuples(small, small).map(list) | st.lists(json_values, max_size=3)
keywords = st.just({}) | st.dictionaries(
    st.sampled_from(["x", "y", "message"]) | st.text(max_size=4), json_values, max_size=2
)
LONG = "x" * 256


def mostly(valid: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, else a draw from ``other``."""
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), other)


names = mostly(
    "demo.add", st.sampled_from(["demo.fail", "demo.nope", "celery.ping", "", LONG]) | st.text(max_size=12)
)
short_text = st.sampled_from(["", "", "q1", "celery", "order-1", "order-2", LONG]) | st.text(max_size=12)
int64 = st.integers(-(2**63), 2**63 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
#: Mostly sensible times (now give or take a few years), sometimes anything the wire allows.
seconds = st.integers(1_600_000_000, 1_900_000_000) | int64
nanos = st.just(0) | int32
timestamps = st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)
headers = st.just({}) | st.dictionaries(
    st.sampled_from(["x", "task", "ID"]) | st.text(max_size=6), st.text(max_size=6), max_size=2
)
durations = st.builds(duration_pb2.Duration, seconds=st.integers(-5, 400) | int64, nanos=nanos)


def list_value(values: list[Any]) -> struct_pb2.ListValue:
    result = struct_pb2.ListValue()
    result.extend(values)
    return result


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(values)
    return result


@st.composite
def task_requests(
    draw: st.DrawFn, kind: type[pb.EnqueueRequest] | type[pb.EnqueueAtRequest]
) -> message.Message:
    request = kind(
        task_name=draw(names),
        args=list_value(draw(arguments)),
        kwargs=struct(draw(keywords)),
        queue=draw(mostly("", short_text)),
        request_id=draw(mostly("", short_text)),
        headers=draw(mostly({}, headers)),
    )
    if draw(st.booleans()):
        request.priority = draw(st.integers(0, 9) | int32)
    if not draw(mostly(True, st.just(False))):
        request.expire_time.CopyFrom(draw(timestamps))
    if isinstance(request, pb.EnqueueRequest):
        if not draw(mostly(True, st.just(False))):
            request.countdown.CopyFrom(draw(durations))
    elif draw(st.integers(0, 9)):
        request.run_time.CopyFrom(draw(timestamps))
    return request


@dataclass(frozen=True)
class Case:
    method: str
    payload: message.Message | bytes

    @property
    def well_formed(self) -> bool:
        if isinstance(self.payload, message.Message):
            return True
        request_type, _ = METHODS[self.method]
        try:
            request_type.FromString(self.payload)
        except message.DecodeError:
            return False
        return True


def cases(known_ids: list[str]) -> st.SearchStrategy[Case]:
    task_ids = st.sampled_from([*known_ids, LONG]) | st.uuids().map(str) | st.text(max_size=40)
    return st.one_of(
        task_requests(pb.EnqueueRequest).map(lambda r: Case("Enqueue", r)),
        task_requests(pb.EnqueueAtRequest).map(lambda r: Case("EnqueueAt", r)),
        task_ids.map(lambda t: Case("GetStatus", pb.GetStatusRequest(task_id=t))),
        task_ids.map(lambda t: Case("StreamProgress", pb.StreamProgressRequest(task_id=t))),
        st.tuples(st.sampled_from(sorted(METHODS)), st.binary(max_size=256)).map(lambda mb: Case(*mb)),
    )


# --- the property ------------------------------------------------------------------------


def start(channel: grpc.Channel, case: Case) -> Callable[[], grpc.StatusCode]:
    """Send ``case`` (raw bytes through identity serializers); returns a function that waits
    for the status code it ends with."""
    payload = case.payload if isinstance(case.payload, bytes) else case.payload.SerializeToString()
    _, streaming = METHODS[case.method]
    if streaming:
        responses = channel.unary_stream(SERVICE + case.method)(payload, timeout=CALL_TIMEOUT)

        def drain() -> None:
            for _ in responses:
                pass

        finish: Callable[[], Any] = drain
    else:
        finish = channel.unary_unary(SERVICE + case.method).future(payload, timeout=CALL_TIMEOUT).result

    def code() -> grpc.StatusCode:
        try:
            finish()
        except grpc.RpcError as error:
            status: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
            return status
        return grpc.StatusCode.OK

    return code


def run_property(port: int, known_ids: list[str]) -> collections.Counter[str]:
    codes: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:

        @settings(
            max_examples=EXAMPLES // BATCH,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=st.lists(cases(known_ids), min_size=BATCH, max_size=BATCH))
        def property_holds(batch: list[Case]) -> None:
            waits = [start(channel, case) for case in batch]  # in flight together
            for case, wait in zip(batch, waits, strict=True):
                code = wait()
                codes[f"{case.method}:{code.name}"] += 1
                assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{case} hung"
                if case.well_formed:
                    assert code in EXPECTED, f"{case.method} answered {code.name} to a well-formed {case}"
                else:
                    assert code in EXPECTED | {grpc.StatusCode.UNKNOWN}, f"{code.name} for {case}"

        property_holds()
    return codes


def hub_connections(client: redis.Redis) -> int:
    prefix = f"{CLIENT_NAME}-{os.getpid()}-"
    return sum(1 for entry in client.client_list() if str(entry.get("name", "")).startswith(prefix))


async def settle(probe: Callable[[], int], most: int, timeout: float = 15) -> int:
    """``probe()`` once it is at most ``most`` (or its last value after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while (value := probe()) > most and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return value


@pytest.mark.timeout(400)
async def test_fuzz_the_live_server(
    server_port: int,
    channel: aio.Channel,
    stub: pb_grpc.TaskServiceStub,
    runtime: Runtime,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    known = [await enqueue(stub, "demo.add", i, i) for i in range(3)]
    for task_id in known:
        await wait_state(stub, task_id)
    watchers = runtime.hub.watcher_count
    # the background loops check connections out for a moment: take the quiet value
    checked_out = await settle(runtime.store.engine.pool.checkedout, 0)  # type: ignore[attr-defined]
    connections = hub_connections(redis_client)

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="service.api.status"):
        codes = await asyncio.to_thread(run_property, server_port, known)
    elapsed = time.monotonic() - started
    print(f"\n{sum(codes.values())} calls in {elapsed:.0f}s: {dict(sorted(codes.items()))}")

    assert sum(codes.values()) >= EXAMPLES
    assert not [r for r in caplog.records if r.name == "service.api.status"], "a handler failed with INTERNAL"
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert await settle(lambda: runtime.hub.watcher_count, watchers) <= watchers
    pool = runtime.store.engine.pool
    assert await settle(pool.checkedout, checked_out) <= checked_out  # type: ignore[attr-defined]
    # the hub's read pool may have opened idle connections up to its bound, never more
    bound = max(connections, HUB_CONNECTIONS)
    assert await settle(lambda: hub_connections(redis_client), bound) <= bound
