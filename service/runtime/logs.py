"""Logging for ``taskgate serve|migrate|dev``: text lines, or one JSON object per line.

``TASKGATE_LOG_FORMAT=json`` writes each record as one JSON object on one line::

    {"time": "2026-01-02T03:04:05.678+00:00", "level": "INFO", "logger": "service.app",
     "message": "…", "task_id": "…", "trace_id": "…", "exception": "Traceback …"}

``task_id`` is there when the record has one (``extra={"task_id": …}``, or the message
names it as ``task_id=<id>``, as the gateway's own lines do); ``trace_id`` (32 hex digits)
when an OpenTelemetry span is active (``service/runtime/tracing.py``); ``exception`` when
the record carries one. Text lines end with `` trace_id=<id>`` when a span is active.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from typing import Any, Literal

import orjson
from opentelemetry import trace

#: The text format (the default).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TASK_ID = re.compile(r"\btask_id=([^\s,;:]+)")

LogFormat = Literal["text", "json"]


def current_trace_id() -> str:
    """The active span's trace id as 32 hex digits; "" when no span is active."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def _task_id(record: logging.LogRecord, message: str) -> str:
    given = getattr(record, "task_id", None)
    if given:
        return str(given)
    found = _TASK_ID.search(message) if "task_id=" in message else None
    return found.group(1) if found else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (without the newline)."""
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        task_id = _task_id(record, message)
        if task_id:
            line["task_id"] = task_id
        trace_id = current_trace_id()
        if trace_id:
            line["trace_id"] = trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with `` trace_id=<id>`` appended while a span is active."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a text line."""
        text = super().format(record)
        trace_id = current_trace_id()
        return f"{text} trace_id={trace_id}" if trace_id else text


def setup(level: str, log_format: LogFormat = "text") -> None:
    """Configure the root logger: ``level`` (a level name) and the format, on stderr."""
    # the formats use none of these: skip collecting them for every record (the logging
    # HOWTO's "Optimization" section; it is a tenth of an Enqueue's CPU with the audit line)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


__all__ = ["JsonFormatter", "LogFormat", "TextFormatter", "current_trace_id", "setup"]
