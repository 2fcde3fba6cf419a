"""Protobuf <-> domain conversion in service.api.convert."""

from __future__ import annotations

import dataclasses
import decimal
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from service.api import convert
from service.domain.errors import InvalidRequest
from service.domain.model import Progress, TaskError, TaskRecord, TaskState
from taskgate.v1 import task_service_pb2 as pb

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def list_value(items: list[Any]) -> struct_pb2.ListValue:
    return json_format.ParseDict(items, struct_pb2.ListValue())


def test_from_list_value_turns_integral_doubles_into_ints() -> None:
    result = convert.from_list_value(list_value([1, 2.5, "a", True, None, [3, {"n": 4}]]))
    assert result == [1, 2.5, "a", True, None, [3, {"n": 4}]]
    assert type(result[0]) is int
    assert type(result[1]) is float
    assert type(result[5][0]) is int
    assert type(result[5][1]["n"]) is int


def test_from_struct_turns_integral_doubles_into_ints() -> None:
    struct = convert.to_struct({"a": 1, "b": 2.5, "c": {"d": [7.0]}})
    result = convert.from_struct(struct)
    assert result == {"a": 1, "b": 2.5, "c": {"d": [7]}}
    assert type(result["a"]) is int
    assert type(result["b"]) is float
    assert type(result["c"]["d"][0]) is int


def test_jsonable() -> None:
    moment = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    value = {
        "when": moment,
        "raw": b"\x00\xffhi",
        "id": ident,
        "amount": decimal.Decimal("1.10"),
        "pair": (1, 2),
        "set": {3},
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "nested": {1: {None: 2.5}},
    }
    assert convert.jsonable(value) == {
        "when": "2024-05-06T07:08:09+00:00",
        "raw": "AP9oaQ==",
        "id": "12345678-1234-5678-1234-567812345678",
        "amount": "1.10",
        "pair": [1, 2],
        "set": [3],
        "nan": "nan",
        "inf": "inf",
        "ninf": "-inf",
        "nested": {"1": {"None": 2.5}},
    }


def test_to_value_none_is_null_value() -> None:
    value = convert.to_value(None)
    assert value.WhichOneof("kind") == "null_value"


def enqueue(**fields: Any) -> pb.EnqueueRequest:
    return pb.EnqueueRequest(**{"task_name": "demo.add", **fields})


def enqueue_at(**fields: Any) -> pb.EnqueueAtRequest:
    fields.setdefault("run_time", convert.to_timestamp(T0))
    return pb.EnqueueAtRequest(**{"task_name": "demo.add", **fields})


def test_enqueue_spec_decodes_fields() -> None:
    request = enqueue(
        args=list_value([1, 2]),
        kwargs=convert.to_struct({"k": 3}),
        queue="q",
        request_id="r",
        priority=0,
        countdown=duration_pb2.Duration(seconds=5),
        expire_time=convert.to_timestamp(T0),
        headers={"h": "v"},
    )
    spec = convert.enqueue_spec(request)
    assert spec.task_name == "demo.add"
    assert spec.args == [1, 2]
    assert spec.kwargs == {"k": 3}
    assert (spec.queue, spec.request_id, spec.priority, spec.countdown) == ("q", "r", 0, 5.0)
    assert spec.expire_time == T0
    assert spec.headers == {"h": "v"}
    assert spec.run_time is None


def test_enqueue_spec_absent_optionals_are_none() -> None:
    spec = convert.enqueue_spec(enqueue())
    assert (spec.priority, spec.countdown, spec.expire_time) == (None, None, None)


def test_enqueue_at_spec_decodes_run_time() -> None:
    spec = convert.enqueue_at_spec(enqueue_at(expire_time=convert.to_timestamp(T0 + timedelta(seconds=1))))
    assert spec.run_time == T0
    assert spec.countdown is None


DECODERS = [(enqueue, convert.enqueue_spec), (enqueue_at, convert.enqueue_at_spec)]


@pytest.mark.parametrize(("make", "decode"), DECODERS)
@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"task_name": ""}, "task_name"),
        ({"task_name": "x" * 256}, "task_name"),
        ({"queue": "q" * 256}, "queue"),
        ({"request_id": "r" * 256}, "request_id"),
        ({"priority": -1}, "priority"),
        ({"priority": 10}, "priority"),
    ],
)
def test_invalid_common_fields(make: Any, decode: Any, fields: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidRequest, match=name):
        decode(make(**fields))


def test_boundary_values_are_accepted() -> None:
    spec = convert.enqueue_spec(
        enqueue(task_name="x" * 255, queue="q" * 255, request_id="r" * 255, priority=9)
    )
    assert (len(spec.task_name), len(spec.queue), len(spec.request_id), spec.priority) == (255, 255, 255, 9)
    assert convert.enqueue_spec(enqueue(countdown=duration_pb2.Duration())).countdown == 0


def test_negative_countdown_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="countdown"):
        convert.enqueue_spec(enqueue(countdown=duration_pb2.Duration(seconds=-1)))


def test_enqueue_at_without_run_time_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="run_time"):
        convert.enqueue_at_spec(pb.EnqueueAtRequest(task_name="demo.add"))


@pytest.mark.parametrize("offset", [0, -1])
def test_expire_time_not_after_run_time_is_invalid(offset: int) -> None:
    request = enqueue_at(expire_time=convert.to_timestamp(T0 + timedelta(seconds=offset)))
    with pytest.raises(InvalidRequest, match="expire_time"):
        convert.enqueue_at_spec(request)


def test_task_id_of() -> None:
    assert convert.task_id_of(pb.GetStatusRequest(task_id="abc")) == "abc"
    assert convert.task_id_of(pb.StreamProgressRequest(task_id="abc")) == "abc"
    with pytest.raises(InvalidRequest, match="task_id"):
        convert.task_id_of(pb.GetStatusRequest(task_id=""))
    with pytest.raises(InvalidRequest, match="task_id"):
        convert.task_id_of(pb.StreamProgressRequest(task_id="x" * 256))


@pytest.mark.parametrize("state", list(TaskState))
def test_state_to_proto(state: TaskState) -> None:
    assert pb.TaskState.Name(convert.state_to_proto(state)) == f"TASK_STATE_{state.name}"


RECORD = TaskRecord(
    task_id="t1",
    task_name="demo.add",
    state=TaskState.RUNNING,
    create_time=T0,
    run_time=T0 + timedelta(seconds=1),
    update_time=T0 + timedelta(seconds=2),
    queue="q",
    request_id="r",
    retries=2,
    result="ignored unless SUCCEEDED",
)


def test_task_to_proto_minimal() -> None:
    task = convert.task_to_proto(RECORD)
    assert (task.task_id, task.task_name, task.queue, task.request_id, task.retries) == (
        "t1",
        "demo.add",
        "q",
        "r",
        2,
    )
    assert task.state == pb.TASK_STATE_RUNNING
    assert convert.to_datetime(task.create_time) == T0
    assert convert.to_datetime(task.run_time) == RECORD.run_time
    assert convert.to_datetime(task.update_time) == RECORD.update_time
    for name in ("result", "error", "progress", "start_time", "end_time"):
        assert not task.HasField(name), name


def test_task_to_proto_full() -> None:
    record = dataclasses.replace(
        RECORD,
        state=TaskState.SUCCEEDED,
        result={"sum": 3},
        progress=Progress(2, 4, "half", {"k": "v"}),
        error=TaskError(type="ValueError", message="boom", traceback="tb"),
        start_time=T0 + timedelta(seconds=3),
        end_time=T0 + timedelta(seconds=4),
    )
    task = convert.task_to_proto(record)
    assert json_format.MessageToDict(task.result) == {"sum": 3}
    assert (task.progress.current, task.progress.total, task.progress.message) == (2, 4, "half")
    assert json_format.MessageToDict(task.progress.details) == {"k": "v"}
    assert (task.error.type, task.error.message, task.error.traceback) == ("ValueError", "boom", "tb")
    assert convert.to_datetime(task.start_time) == record.start_time
    assert convert.to_datetime(task.end_time) == record.end_time


def test_task_to_proto_succeeded_with_none_result_is_null_value() -> None:
    task = convert.task_to_proto(dataclasses.replace(RECORD, state=TaskState.SUCCEEDED, result=None))
    assert task.HasField("result")
    assert task.result.WhichOneof("kind") == "null_value"
