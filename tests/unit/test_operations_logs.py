"""TASKGATE_LOG_FORMAT=json: every line is one JSON object; task_id and trace_id when known."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from service.runtime.logs import JsonFormatter, TextFormatter


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("taskgate.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_a_json_object(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("plain %s", "message")
    logger.warning("task_id=%s: the database refused this update; dropped", "abc-123")
    logger.info("audit", extra={"task_id": "from-extra"})
    logger.info('multi\nline "quoted" ünïcode')
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    lines = _lines(stream)
    assert len(lines) == 5
    assert lines[0]["message"] == "plain message" and lines[0]["level"] == "INFO"
    assert lines[0]["logger"] == "taskgate.test.logs" and str(lines[0]["time"]).endswith("+00:00")
    assert "task_id" not in lines[0] and "trace_id" not in lines[0]
    assert lines[1]["task_id"] == "abc-123"
    assert lines[2]["task_id"] == "from-extra"
    assert lines[3]["message"] == 'multi\nline "quoted" ünïcode'
    assert "ValueError: boom" in str(lines[4]["exception"])


def test_trace_id_while_a_span_is_active(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    tracer = TracerProvider().get_tracer("test")  # not the global provider
    with tracer.start_as_current_span("rpc") as span:
        logger.info("inside")
        text = TextFormatter("%(message)s").format(logging.makeLogRecord({"msg": "text"}))
    logger.info("outside")
    inside, outside = _lines(stream)
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert inside["trace_id"] == trace_id
    assert "trace_id" not in outside
    assert text == f"text trace_id={trace_id}"
