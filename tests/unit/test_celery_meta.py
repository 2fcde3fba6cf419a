"""Reading Celery result documents: service.results.document."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kombu.utils.json import dumps

from service.domain.model import Progress, TaskError, TaskState, TaskUpdate
from service.results.document import parse_document, parse_payload
from taskgate.worker.contract import FEED_MARK

OBSERVED = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
DONE = datetime(2024, 1, 1, 11, 59, 30, 250000, tzinfo=UTC)
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n'


def parse(**document: Any) -> TaskUpdate | None:
    return parse_document("t1", {"task_id": "ignored", **document}, OBSERVED)


def test_started_is_running_with_start_time() -> None:
    update = parse(status="STARTED", result={"pid": 1, "hostname": "w"})
    assert update == TaskUpdate(
        task_id="t1", state=TaskState.RUNNING, observed_time=OBSERVED, start_time=OBSERVED, worker="w"
    )


def test_progress_is_running_with_progress() -> None:
    meta = {"current": 2, "total": 5, "message": "step 2 of 5", "details": {"k": "v"}}
    update = parse(status="PROGRESS", result=meta)
    assert update is not None
    assert update.state is TaskState.RUNNING
    assert update.progress == Progress(current=2.0, total=5.0, message="step 2 of 5", details={"k": "v"})


def test_success_has_result_and_aware_end_time() -> None:
    update = parse(status="SUCCESS", result={"sum": 3}, date_done=DONE.isoformat(), retries=0)
    assert update is not None
    assert update.state is TaskState.SUCCEEDED
    assert update.result == {"sum": 3}
    assert update.end_time == DONE
    assert update.end_time is not None
    assert update.end_time.utcoffset() == timedelta(0)
    assert update.retries == 0


def test_naive_date_done_is_read_as_utc() -> None:
    update = parse(status="SUCCESS", result=1, date_done="2024-01-01T11:59:30.250000")
    assert update is not None
    assert update.end_time == DONE


def test_failure_has_task_error() -> None:
    result = {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}
    update = parse(status="FAILURE", result=result, traceback=TRACEBACK, date_done=DONE.isoformat())
    assert update is not None
    assert update.state is TaskState.FAILED
    assert update.error == TaskError(type="ValueError", message="boom", traceback=TRACEBACK)
    assert update.end_time == DONE
    assert update.result is None


def test_retry_is_retrying_with_retries() -> None:
    result = {"exc_type": "ConnectionError", "exc_message": ["refused"], "exc_module": "builtins"}
    update = parse(status="RETRY", result=result, retries=2)
    assert update is not None
    assert update.state is TaskState.RETRYING
    assert update.retries == 2
    assert update.error is not None
    assert update.error == TaskError(type="ConnectionError", message="refused")


def test_revoked_is_cancelled() -> None:
    result = {"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"}
    update = parse(status="REVOKED", result=result)
    assert update is not None
    assert update.state is TaskState.CANCELLED


@pytest.mark.parametrize("status", ["PENDING", "RECEIVED", None])
def test_ignored_states(status: str | None) -> None:
    assert parse(status=status, result=None) is None


def test_custom_state_is_running_with_progress() -> None:
    update = parse(status="UPLOADING", result={"current": 1, "total": 3, "file": "a.csv"})
    assert update is not None
    assert update.state is TaskState.RUNNING
    assert update.progress == Progress(current=1.0, total=3.0, details={"file": "a.csv"})


@pytest.mark.parametrize("payload", [b"\xff\xfe\x00garbage", b"{not json", b"", "[1, 2]", b"null"])
def test_parse_payload_ignores_garbage(payload: bytes | str) -> None:
    assert parse_payload("t1", payload, OBSERVED) is None


def test_parse_payload_decodes_kombu_json() -> None:
    document = {
        "status": "SUCCESS",
        "result": [1, "two"],
        "traceback": None,
        "children": [],
        "date_done": DONE,
        "task_id": "t1",
        "retries": 1,
    }
    update = parse_payload("t1", dumps(document).encode(), OBSERVED)
    assert update == TaskUpdate(
        task_id="t1",
        state=TaskState.SUCCEEDED,
        observed_time=OBSERVED,
        result=[1, "two"],
        retries=1,
        end_time=DONE,
    )


def test_a_feed_workers_mark_is_read() -> None:
    marked = parse(status="STARTED", result={"pid": 1}, **{FEED_MARK: 1})
    assert marked is not None and marked.in_feed
    plain = parse(status="STARTED", result={"pid": 1})
    assert plain is not None and not plain.in_feed
