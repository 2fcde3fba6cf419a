"""A ListTasks query as the domain sees it: a filter tree, an order, a page.

``service/api/listing.py`` parses AIP-160 filter text into these nodes;
``service/store/listing.py`` turns them into bound SQL (never by string concatenation).
No gRPC, no SQL here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from service.domain.model import TaskState


class Op(enum.StrEnum):
    """A comparison operator of the filter language."""

    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="


class Field(enum.StrEnum):
    """A task field a filter may compare."""

    STATE = "state"
    TASK_NAME = "task_name"
    QUEUE = "queue"
    REQUEST_ID = "request_id"
    CREATE_TIME = "create_time"
    END_TIME = "end_time"
    SCHEDULE_ID = "schedule_id"
    WORKFLOW_ID = "workflow_id"


#: The fields whose values are times (RFC 3339 in the filter text).
TIME_FIELDS = frozenset({Field.CREATE_TIME, Field.END_TIME})

Value = str | datetime | TaskState


@dataclass(frozen=True, slots=True)
class Compare:
    """``field op value``; ``prefix``: a task_name/queue/request_id value ending in ``*``
    (the ``*`` removed) that matches every value starting with it (``=`` and ``!=`` only)."""

    field: Field
    op: Op
    value: Value
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class All:
    """Every part holds (AND)."""

    parts: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Any:
    """At least one part holds (OR)."""

    parts: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """The part does not hold."""

    part: Expr


Expr = Compare | All | Any | Not


class PageKey(NamedTuple):
    """Where a page ended: the last task's ``(create_time, task_id)`` (the keyset)."""

    create_time: datetime
    task_id: str


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """One page of a listing.

    Attributes:
        filter: The filter tree; None means every task.
        newest_first: ``create_time desc`` (True, the default) or ascending.
        owner: Only the tasks this caller enqueued; None means every caller's.
        limit: How many tasks at most.
        after: The key of the previous page's last task; None for the first page.
    """

    filter: Expr | None = None
    newest_first: bool = True
    owner: str | None = None
    limit: int = 50
    after: PageKey | None = None
