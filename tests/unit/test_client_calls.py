"""The client's requests: task arguments and enqueue options never mix (no server needed)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from google.protobuf import json_format

from taskgate import _convert
from taskgate._convert import TaskCall
from taskgate.adapter import TaskgateTaskQueue
from taskgate.client import Client
from taskgate.v1 import task_service_pb2 as pb

OPTION_NAMES = {
    "queue": "q",
    "priority": 1,
    "countdown": 2,
    "headers": "h",
    "expire_time": "e",
    "request_id": "r",
}
SOON = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def kwargs_of(request: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(request.kwargs)
    return result


def test_kwargs_named_like_options_stay_task_kwargs() -> None:
    request = _convert.enqueue_request(TaskCall("demo.echo", (), OPTION_NAMES), None)
    assert kwargs_of(request) == OPTION_NAMES
    assert request.queue == ""
    assert not request.HasField("priority")
    assert not request.HasField("countdown")
    assert not request.HasField("expire_time")
    assert request.request_id == ""
    assert dict(request.headers) == {}


def test_options_fill_their_own_fields() -> None:
    call = TaskCall(
        "demo.add", [1], {"y": 2}, queue="fast", priority=0, countdown=dt.timedelta(seconds=1.5),
        expire_time=SOON, headers={"x-origin": "unit"},
    )  # fmt: skip
    request = _convert.enqueue_request(call, "req-1")
    assert json_format.MessageToDict(request.args) == [1]
    assert kwargs_of(request) == {"y": 2}
    assert (request.queue, request.priority, request.request_id) == ("fast", 0, "req-1")
    assert request.countdown.ToTimedelta() == dt.timedelta(seconds=1.5)
    assert request.expire_time.ToDatetime(tzinfo=dt.UTC) == SOON
    assert dict(request.headers) == {"x-origin": "unit"}


def test_countdown_in_seconds() -> None:
    request = _convert.enqueue_request(TaskCall("demo.add", countdown=2.25), None)
    assert request.countdown.ToTimedelta() == dt.timedelta(seconds=2.25)


def test_run_time_makes_an_enqueue_at_request() -> None:
    call = TaskCall("demo.echo", (), {"run_time": "task's"}, run_time=SOON, queue="q")
    request = _convert.enqueue_at_request(call, "r")
    assert request.run_time.ToDatetime(tzinfo=dt.UTC) == SOON
    assert kwargs_of(request) == {"run_time": "task's"}
    assert (request.queue, request.request_id) == ("q", "r")
    with pytest.raises(ValueError, match="EnqueueAt"):
        _convert.enqueue_request(call, None)
    with pytest.raises(ValueError, match="needs a run_time"):
        _convert.enqueue_at_request(TaskCall("demo.add"), None)


def test_batch_keeps_each_tasks_kwargs_and_options_apart() -> None:
    request = _convert.batch_request(
        [
            TaskCall("demo.echo", (), {"queue": "task's"}),
            TaskCall("demo.add", (1, 2), queue="q", run_time=SOON),
        ],
        "batch",
    )
    first, second = request.tasks
    assert kwargs_of(first) == {"queue": "task's"}
    assert first.queue == ""
    assert second.queue == "q"
    assert second.WhichOneof("schedule") == "run_time"
    assert request.request_id == "batch"


def test_task_call_options_are_keyword_only_and_checked() -> None:
    with pytest.raises(TypeError):
        TaskCall("demo.add", (), {}, "a-queue")  # type: ignore[misc]
    with pytest.raises(TypeError, match="list or a tuple"):
        TaskCall("demo.add", "12")
    with pytest.raises(TypeError, match="mapping"):
        TaskCall("demo.add", (), [("x", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        TaskCall("demo.add", countdown=1, run_time=SOON)


def test_send_task_checks_arguments_before_sending() -> None:
    with Client("127.0.0.1:1", timeout=1) as sync:
        with pytest.raises(ValueError, match="not both"):
            sync.send_task("demo.add", (1, 2), countdown=1, run_time=SOON)
        with pytest.raises(ValueError, match="timezone-aware"):
            sync.send_task("demo.add", (1, 2), run_time=dt.datetime(2030, 1, 1))
        with pytest.raises(TypeError, match="list or a tuple"):
            sync.send_task("demo.add", "12")


def test_adapter_refuses_a_kwarg_given_both_ways() -> None:
    with Client("127.0.0.1:1", timeout=1) as sync:
        queue = TaskgateTaskQueue(sync)
        with pytest.raises(TypeError, match=r"\['x'\]"):
            queue.enqueue("demo.add", kwargs={"x": 1}, x=2)
        with pytest.raises(TypeError, match=r"\['y'\]"):
            queue.enqueue_at("demo.add", SOON, kwargs={"y": 1}, y=2)


def test_send_request_picks_enqueue_at_for_a_run_time() -> None:
    assert isinstance(_convert.send_request(TaskCall("demo.add"), None), pb.EnqueueRequest)
    assert isinstance(_convert.send_request(TaskCall("demo.add", run_time=SOON), None), pb.EnqueueAtRequest)
