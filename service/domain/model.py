"""What a task is to the gateway, and the pure rules of how its state changes."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar


class TaskState(enum.StrEnum):
    """The lifecycle of a task (the proto's ``TaskState`` without its prefix)."""

    QUEUED = "QUEUED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    #: a workflow step waiting for the steps before it (sent once they succeed)
    WAITING = "WAITING"

    @property
    def terminal(self) -> bool:
        """True for the states that never change again."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task as a caller asked for it, already decoded and validated in form.

    ``countdown`` (seconds) and ``run_time`` are kept as the caller gave them, so that a
    retried request with the same ``request_id`` has the same fingerprint.
    """

    task_name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    request_id: str = ""
    priority: int | None = None
    countdown: float | None = None
    run_time: datetime | None = None
    expire_time: datetime | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds: Celery's hard time limit (None: the worker's default)
    time_limit: float | None = None
    #: seconds: Celery's soft time limit (None: the worker's default)
    soft_time_limit: float | None = None

    def fingerprint(self) -> str:
        """A digest of everything but the request_id: equal requests, equal digests."""
        body = dataclasses.asdict(self)
        body.pop("request_id")
        for key in ("time_limit", "soft_time_limit"):
            if body[key] is None:
                body.pop(key)  # digests of requests without limits stay as they were
        for key in ("run_time", "expire_time"):
            if body[key] is not None:
                body[key] = body[key].isoformat()
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Progress:
    """What a task last reported about how far it has come."""

    current: float = 0.0
    total: float = 0.0
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskError:
    """An exception raised by a task."""

    type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """Everything the gateway knows of one task."""

    task_id: str
    task_name: str
    state: TaskState
    create_time: datetime
    run_time: datetime
    update_time: datetime
    queue: str = ""
    request_id: str = ""
    caller: str = ""
    retries: int = 0
    progress: Progress | None = None
    result: Any = None
    error: TaskError | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    #: CancelTask was called for it
    cancel_requested: bool = False
    #: the schedule that fired it ("" when none)
    schedule_id: str = ""
    #: the workflow it is a step of ("" when none)
    workflow_id: str = ""
    #: recorded from the result backend, not enqueued through the gateway
    adopted: bool = False

    def as_of(self, now: datetime) -> TaskRecord:
        """The record as a caller should see it at ``now``: SCHEDULED turns QUEUED once due."""
        if self.state is TaskState.SCHEDULED and self.run_time <= now:
            return dataclasses.replace(self, state=TaskState.QUEUED)
        return self


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    """One state change of a task, as read from the result backend.

    Fields left ``None`` are not changed by it.
    """

    task_id: str
    state: TaskState
    observed_time: datetime
    progress: Progress | None = None
    result: Any = None
    error: TaskError | None = None
    retries: int | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    #: the Celery node name (``celery@host``) of the worker that started the task (STARTED
    #: documents only); the store keeps it to watch that worker's heartbeat
    worker: str | None = None
    #: what the document says of the call (``result_extended``); only adoption reads it
    origin: TaskOrigin | None = field(default=None, compare=False)
    #: the document says the state feed carries it too (a taskgate worker wrote it): a
    #: gateway consuming the feed writes it from there, not from pub/sub
    in_feed: bool = field(default=False, compare=False)
    #: where the state feed's entry of this update stands in the stream (``feed_position``
    #: of service/results/feed.py; None: not from the feed): an unfinished task does not
    #: take an update older than one it has taken (replicas write entries out of order)
    feed_position: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class TaskOrigin:
    """The call a result document describes (Celery's ``result_extended`` fields): enough to
    record a task sent around the gateway (``TASKGATE_ADOPT_FOREIGN``)."""

    task_name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the publisher needs to hand one task to Celery."""

    task_id: str
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    run_time: datetime
    queue: str = ""
    priority: int | None = None
    expire_time: datetime | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds: Celery's hard and soft time limits (the ``timelimit`` header); None: none
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: the whole message as Celery's canvas builds it (``{"headers": …, "body": [args,
    #: kwargs, embed]}``: a workflow's entry step, with its chain, group and chord); None:
    #: built from the fields above
    message: dict[str, Any] | None = None
    #: the W3C trace context of the call that enqueued it (``traceparent``, ``tracestate``),
    #: written as top-level message headers; None: not traced
    trace_headers: dict[str, str] | None = None


def merge_updates(older: TaskUpdate, newer: TaskUpdate) -> TaskUpdate:
    """Fold two updates of one task into one, keeping what the newer one does not say.

    A terminal update is never replaced by a later non-terminal one; the later one may
    still fill in what a terminal record takes late (``late_fill``: an earlier start, a
    further progress), as the store would if the two were written one after the other.
    """
    if older.state.terminal and not newer.state.terminal:
        return late_fill(older, newer, bound=incoming(older, END_FIELD))
    return dataclasses.replace(
        newer,
        progress=newer.progress or older.progress,
        retries=newer.retries if newer.retries is not None else older.retries,
        start_time=older.start_time or newer.start_time,
        worker=newer.worker or older.worker,
        origin=newer.origin or older.origin,
    )


class Take(enum.Enum):
    """How a record's field takes the value an update brings for it (``None``: nothing)."""

    #: the update's value, even None
    ALWAYS = "always"
    #: the update's value unless it is None: ``coalesce(new, old)``
    IF_GIVEN = "if_given"
    #: the record's value unless it is None: ``coalesce(old, new)`` (set once)
    IF_UNSET = "if_unset"
    #: the update's value (even None) when the update's state is SUCCEEDED, else the record's
    IF_SUCCEEDED = "if_succeeded"
    #: the update's value when it is earlier than the record's or the record has none
    EARLIEST = "earliest"
    #: the update's ``Progress`` when it is further along than the record's (a greater
    #: ``current``; the totals are not compared, a tie keeps the record's) or the record has none
    FURTHEST = "furthest"


@dataclass(frozen=True, slots=True)
class FieldRule:
    """One field of the transition rule: which field, how it takes the update's value, and
    how it still takes one once the record is terminal (``late``; None: never)."""

    field: str
    take: Take
    late: Take | None = None


def incoming(update: TaskUpdate, field: str) -> Any:
    """The value ``update`` brings for the record's ``field`` (None: it brings none).

    ``update_time`` is when the update was observed; ``end_time`` is set by a terminal
    update only: the end its worker stamped, or else when it was observed.
    """
    if field == "update_time":
        return update.observed_time
    if field == "end_time":
        return (update.end_time or update.observed_time) if update.state.terminal else None
    return getattr(update, field)


#: The one transition rule, for the domain and every store path (the store generates its
#: SQL from it). Besides these fields:
#:
#: - a record in a ``TERMINAL_STATES`` state keeps its state, result, error, end_time,
#:   retries and update_time for good: only the fields with a ``late`` take may still be
#:   filled in by an update that arrives after it ended (states race in from pub/sub, the
#:   state feed, GetStatus's refresh and the reconcile: a STARTED or the last PROGRESS may
#:   be recorded after the SUCCESS). The start moves EARLIER to a start the update brings
#:   (also replacing one filled in from the end, see below), but a start later than the
#:   record's ``END_FIELD`` is ignored; the progress is taken when the record has none or
#:   the update's is FURTHEST along. Such a late fill-in leaves ``update_time`` as it was
#:   (the time the task was seen ending: late news of its run is no new change of state,
#:   and a terminal record is never re-listed as recently updated); an update that fills
#:   in nothing leaves the record as it is (``apply_update`` returns it, the store's
#:   UPDATE skips its row);
#: - times are never inverted: an update that brings an ``END_FIELD`` value sets
#:   ``START_FIELD`` to that value when the start is unknown or later than it (the start is
#:   seen on the gateway's clock, the end stamped on the worker's).
TRANSITION_RULES: tuple[FieldRule, ...] = (
    FieldRule("state", Take.ALWAYS),
    FieldRule("update_time", Take.ALWAYS),
    FieldRule("error", Take.ALWAYS),
    FieldRule("progress", Take.IF_GIVEN, late=Take.FURTHEST),
    FieldRule("retries", Take.IF_GIVEN),
    FieldRule("result", Take.IF_SUCCEEDED),
    FieldRule("end_time", Take.IF_GIVEN),
    FieldRule("start_time", Take.IF_UNSET, late=Take.EARLIEST),
)
START_FIELD = "start_time"
END_FIELD = "end_time"
_Ended = TypeVar("_Ended", TaskRecord, TaskUpdate)


def take(kind: Take, old: Any, new: Any, state: TaskState) -> Any:
    """The value of a field taken as ``kind`` after an update in ``state`` bringing ``new``."""
    if kind is Take.ALWAYS:
        return new
    if kind is Take.IF_GIVEN:
        return old if new is None else new
    if kind is Take.IF_UNSET:
        return new if old is None else old
    if kind is Take.EARLIEST:
        return new if new is not None and (old is None or new < old) else old
    if kind is Take.FURTHEST:
        return new if new is not None and (old is None or new.current > old.current) else old
    return new if state is TaskState.SUCCEEDED else old


def not_after(start: datetime | None, end: datetime | None) -> datetime | None:
    """The start, never later than an end the update brings (and the end if unknown)."""
    if end is not None and (start is None or start > end):
        return end
    return start


def late_incoming(update: TaskUpdate, field: str, bound: datetime | None) -> Any:
    """What ``update`` brings for a late ``field`` of a terminal record that ended at
    ``bound``: as ``incoming``, but no start later than that end."""
    new = incoming(update, field)
    if field == START_FIELD and new is not None and bound is not None and new > bound:
        return None
    return new


def late_fill(ended: _Ended, update: TaskUpdate, bound: datetime | None) -> _Ended:
    """``ended`` (a terminal record or update, ending at ``bound``) with what ``update``
    still fills in by the ``late`` takes of the rule; ``ended`` itself when nothing."""
    changes = {}
    for rule in TRANSITION_RULES:
        if rule.late is None:
            continue
        old = getattr(ended, rule.field)
        new = take(rule.late, old, late_incoming(update, rule.field, bound), update.state)
        if new is not old and new != old:
            changes[rule.field] = new
    return dataclasses.replace(ended, **changes) if changes else ended


def advance(record: TaskRecord, update: TaskUpdate) -> TaskRecord:
    """The record after ``update`` as the store writes it (``update_time`` always moves);
    on a terminal record only the late fill-ins (``late_fill``)."""
    if record.state.terminal:
        return late_fill(record, update, bound=record.end_time)
    changes = {
        rule.field: take(rule.take, getattr(record, rule.field), incoming(update, rule.field), update.state)
        for rule in TRANSITION_RULES
    }
    changes[START_FIELD] = not_after(changes[START_FIELD], incoming(update, END_FIELD))
    return dataclasses.replace(record, **changes)


def apply_update(record: TaskRecord, update: TaskUpdate) -> TaskRecord:
    """The record after ``update``; unchanged when nothing but ``update_time`` would change
    (a repeat is not news to a watcher), and a terminal record but for late fill-ins."""
    new = advance(record, update)
    if new is record or dataclasses.replace(new, update_time=record.update_time) == record:
        return record
    return new
