"""Rows and domain objects: a new task as a row, a row as a record or a delivery, and JSON
as PostgreSQL will take it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from service.domain.model import Delivery, Progress, TaskError, TaskRecord, TaskState


@dataclass(slots=True)
class NewTask:
    """A task about to be recorded: what to publish, its first state, and its outbox mark.

    Its ``TaskRecord`` is built only when asked for: the hot paths never need it.
    """

    delivery: Delivery
    state: TaskState
    caller: str
    request_id: str
    create_time: dt.datetime
    #: digest of the request (only needed with a request_id; empty otherwise)
    fingerprint: str
    #: when the outbox may publish it (the fast path's lease, or a held task's due time);
    #: None: the gateway never publishes it (a workflow step the workers send)
    publish_after: dt.datetime | None
    #: kept in the database until it is due (not handed to the fast path)
    held: bool
    #: the schedule that fired it ("" when none)
    schedule_id: str = ""
    #: the workflow it is a step of ("" when none)
    workflow_id: str = ""

    @property
    def task_id(self) -> str:
        """The new task's id."""
        return self.delivery.task_id

    @property
    def record(self) -> TaskRecord:
        """The task's record as it is once recorded."""
        delivery = self.delivery
        return TaskRecord(
            task_id=delivery.task_id,
            task_name=delivery.task_name,
            state=self.state,
            queue=delivery.queue,
            request_id=self.request_id,
            caller=self.caller,
            create_time=self.create_time,
            run_time=delivery.run_time,
            update_time=self.create_time,
            schedule_id=self.schedule_id,
            workflow_id=self.workflow_id,
        )


#: The columns a new task fills, with their PostgreSQL types (the unnest arrays' and COPY's).
INSERT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("task_id", "varchar"),
    ("task_name", "varchar"),
    ("state", "varchar"),
    ("queue", "varchar"),
    ("args", "jsonb"),
    ("kwargs", "jsonb"),
    ("options", "jsonb"),
    ("caller", "varchar"),
    ("request_id", "varchar"),
    ("fingerprint", "varchar"),
    ("create_time", "timestamptz"),
    ("run_time", "timestamptz"),
    ("update_time", "timestamptz"),
    ("publish_after", "timestamptz"),
    ("schedule_id", "varchar"),
    ("workflow_id", "varchar"),
)
INSERT_NAMES = [name for name, _ in INSERT_COLUMNS]


def vars_of(obj: Progress | TaskError) -> dict[str, Any]:
    """A frozen dataclass with slots as a plain dict for a JSON column."""
    return {name: getattr(obj, name) for name in obj.__slots__}


def options_of(delivery: Delivery) -> dict[str, Any]:
    """The ``options`` column of a delivery."""
    expire = delivery.expire_time.isoformat() if delivery.expire_time else None
    options: dict[str, Any] = {
        "priority": delivery.priority,
        "expire_time": expire,
        "headers": delivery.headers,
    }
    if delivery.time_limit is not None:
        options["time_limit"] = delivery.time_limit
    if delivery.soft_time_limit is not None:
        options["soft_time_limit"] = delivery.soft_time_limit
    if delivery.message is not None:
        options["message"] = delivery.message  # a workflow step: republished as it was built
    if delivery.trace_headers:
        options["trace"] = delivery.trace_headers  # republished by the outbox in the same trace
    return options


def delivery_of(row: Mapping[Any, Any]) -> Delivery:
    """What the publisher needs of a row."""
    options = row["options"] or {}
    expire = options.get("expire_time")
    return Delivery(
        task_id=row["task_id"],
        task_name=row["task_name"],
        args=list(row["args"]),
        kwargs=dict(row["kwargs"]),
        run_time=row["run_time"],
        queue=row["queue"],
        priority=options.get("priority"),
        expire_time=dt.datetime.fromisoformat(expire) if expire else None,
        headers=dict(options.get("headers") or {}),
        time_limit=options.get("time_limit"),
        soft_time_limit=options.get("soft_time_limit"),
        message=options.get("message"),
        trace_headers=options.get("trace"),
    )


def record_of(row: Mapping[Any, Any]) -> TaskRecord:
    """The record of a row."""
    progress = row["progress"]
    error = row["error"]
    return TaskRecord(
        task_id=row["task_id"],
        task_name=row["task_name"],
        state=TaskState(row["state"]),
        queue=row["queue"],
        request_id=row["request_id"] or "",
        caller=row["caller"],
        retries=row["retries"],
        progress=Progress(**progress) if progress is not None else None,
        result=row["result"],
        error=TaskError(**error) if error is not None else None,
        create_time=row["create_time"],
        run_time=row["run_time"],
        update_time=row["update_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        cancel_requested=bool(row.get("cancel_requested", False)),
        schedule_id=row.get("schedule_id") or "",
        workflow_id=row.get("workflow_id") or "",
        adopted=bool(row.get("adopted", False)),
    )


def column_value(value: Any) -> Any:
    """A domain value as a JSON column takes it (``Progress`` and ``TaskError`` as dicts)."""
    return vars_of(value) if isinstance(value, Progress | TaskError) else value


def to_json(value: Any) -> str:
    """JSON of a value the gateway built (orjson)."""
    return orjson.dumps(value).decode()


def any_json(value: Any) -> str:
    """JSON of a value decoded from a worker's document: orjson, or the json module for what
    orjson refuses (integers beyond 64 bits). PostgreSQL cannot store U+0000 in jsonb: it
    becomes U+FFFD (the replacement character)."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = json.dumps(value)
    if "\\u0000" in text:
        return any_json(without_nul(value))
    return text


def without_nul(value: Any) -> Any:
    """A JSON value with every U+0000 replaced by U+FFFD, as every database stores it."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    return value


def insert_row(new: NewTask) -> dict[str, Any]:
    """The row as SQLAlchemy column values."""
    return dict(zip(INSERT_NAMES, insert_values(new, encode=False), strict=True))


def insert_values(new: NewTask, *, encode: bool = True) -> tuple[Any, ...]:
    """The row in ``INSERT_COLUMNS`` order; JSON encoded for the unnest INSERT if ``encode``."""
    delivery = new.delivery
    json_of = to_json if encode else _same
    return (
        delivery.task_id,
        delivery.task_name,
        new.state.value,
        delivery.queue,
        json_of(delivery.args),
        json_of(delivery.kwargs),
        json_of(options_of(delivery)),
        new.caller,
        new.request_id or None,
        new.fingerprint,
        new.create_time,
        delivery.run_time,
        new.create_time,
        new.publish_after,
        new.schedule_id or None,
        new.workflow_id or None,
    )


def _same(value: Any) -> Any:
    return value
