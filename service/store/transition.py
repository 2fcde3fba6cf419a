"""The domain's transition rule (``domain.model.TRANSITION_RULES``) as SQL.

Both store paths are generated from the one rule, never written out by hand: the
PostgreSQL batch ``UPDATE … FROM unnest(…)`` (``UNNEST_UPDATE`` with ``update_row``) and
the portable per-task UPDATE (``update_values``, SQLite for ``taskgate dev``). Besides the
rule's fields, a worker's update clears the task's outbox mark (a worker saw it, so it was
published, whatever the outbox thinks) and records the worker that started it (``worker``:
set when the update names one, never cleared by an update; the recovery pass watches its
heartbeat).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from service.domain.model import (
    END_FIELD,
    START_FIELD,
    TRANSITION_RULES,
    FieldRule,
    Take,
    TaskState,
    TaskUpdate,
    incoming,
)
from service.store.rows import any_json, column_value, without_nul
from service.store.tables import TERMINAL, UTCDateTime, tasks

_SUCCEEDED = TaskState.SUCCEEDED.value
#: The column (and ``TaskUpdate`` field) of the worker that started a task.
WORKER_FIELD = "worker"


def _is_json(field: str) -> bool:
    return isinstance(tasks.c[field].type, sa.JSON)


def _array_type(field: str) -> str:
    """The PostgreSQL array element type a field travels as (JSON as text, cast per row)."""
    kind = tasks.c[field].type
    if isinstance(kind, sa.JSON):
        return "text"
    if isinstance(kind, UTCDateTime):
        return "timestamptz"
    if isinstance(kind, sa.Integer):
        return "int"
    return "varchar"


def _sql(rule: FieldRule) -> str:
    """The new value of ``rule``'s column in the unnest UPDATE (``t`` the row, ``u`` the update)."""
    field = rule.field
    new = f"u.{field}::jsonb" if _is_json(field) else f"u.{field}"
    old = f"t.{field}"
    if rule.take is Take.ALWAYS:
        return new
    if rule.take is Take.IF_GIVEN:
        return f"coalesce({new}, {old})"
    if rule.take is Take.IF_UNSET:
        return f"coalesce({old}, {new})"
    return f"CASE WHEN u.state = '{_SUCCEEDED}' THEN {new} ELSE {old} END"


def _not_after_sql(start: str) -> str:
    """``start``, never later than the end the update brings (the end when it is unknown)."""
    end = f"u.{END_FIELD}"
    return (
        f"CASE\n        WHEN {end} IS NULL THEN {start}\n"
        f"        WHEN {start} IS NULL\n            OR {start} > {end} THEN {end}\n"
        f"        ELSE {start}\n    END"
    )


def _unnest_update() -> str:
    fields = [rule.field for rule in TRANSITION_RULES]
    sets = []
    for rule in TRANSITION_RULES:
        value = _sql(rule)
        sets.append(f"{rule.field} = {_not_after_sql(value) if rule.field == START_FIELD else value}")
    sets += [
        "publish_after = NULL",
        "publish_time = coalesce(t.publish_time, u.update_time)",
        f"{WORKER_FIELD} = coalesce(u.{WORKER_FIELD}, t.{WORKER_FIELD})",
    ]
    fields.append(WORKER_FIELD)
    arrays = ["$1::varchar[]"] + [f"${i}::{_array_type(field)}[]" for i, field in enumerate(fields, 2)]
    terminal = ", ".join(f"'{state}'" for state in TERMINAL)
    assignments = ",\n    ".join(sets)
    return f"""
UPDATE tasks AS t SET
    {assignments}
FROM unnest({", ".join(arrays)})
    AS u(task_id, {", ".join(fields)})
WHERE t.task_id = u.task_id AND t.state NOT IN ({terminal})
    -- rows are locked in task_id order, as every other multi-row UPDATE here does: two
    -- statements over the same tasks then wait for each other instead of deadlocking
    AND t.task_id IN (SELECT task_id FROM tasks WHERE task_id = ANY($1) ORDER BY task_id FOR UPDATE)
"""


#: Every update of a batch in one statement: one array per value of ``update_row``.
UNNEST_UPDATE = _unnest_update()
#: Values per row of ``update_row``: the task_id, the rule's fields, the worker.
UPDATE_WIDTH = 2 + len(TRANSITION_RULES)
_JSON_FIELDS = frozenset(rule.field for rule in TRANSITION_RULES if _is_json(rule.field))


def update_row(update: TaskUpdate) -> tuple[Any, ...]:
    """One update in ``UNNEST_UPDATE``'s array order: the task_id, then what it brings for
    each field of the rule (JSON encoded; a result only with SUCCEEDED, where it is used),
    then its worker."""
    values: list[Any] = [update.task_id]
    for rule in TRANSITION_RULES:
        value = incoming(update, rule.field)
        if rule.take is Take.IF_SUCCEEDED and update.state is not TaskState.SUCCEEDED:
            value = None
        if rule.field in _JSON_FIELDS and value is not None:
            # results are whatever the task returned, decoded by json: keep json for them
            value = any_json(column_value(value))
        elif rule.field == "state":
            value = update.state.value
        values.append(value)
    values.append(update.worker)
    return tuple(values)


def update_values(update: TaskUpdate) -> dict[str, Any]:
    """The column values of the portable UPDATE of one task (guarded by ``not_terminal``)."""
    values: dict[str, Any] = {}
    for rule in TRANSITION_RULES:
        new = incoming(update, rule.field)
        if rule.field in _JSON_FIELDS and new is not None:
            new = without_nul(column_value(new))  # as ``any_json`` does for PostgreSQL
        column = tasks.c[rule.field]
        if rule.take is Take.ALWAYS:
            values[rule.field] = update.state.value if rule.field == "state" else column_value(new)
        elif rule.take is Take.IF_GIVEN and new is not None:
            values[rule.field] = column_value(new)
        elif rule.take is Take.IF_UNSET and new is not None:
            values[rule.field] = sa.func.coalesce(column, sa.literal(new, column.type))
        elif rule.take is Take.IF_SUCCEEDED and update.state is TaskState.SUCCEEDED:
            values[rule.field] = column_value(new)
    end = incoming(update, END_FIELD)
    if end is not None:
        start = values.get(START_FIELD, tasks.c[START_FIELD])
        bound = sa.literal(end, UTCDateTime())
        values[START_FIELD] = sa.case((sa.or_(start.is_(None), start > bound), bound), else_=start)
    if update.worker is not None:
        values[WORKER_FIELD] = update.worker
    values["publish_after"] = None
    observed = sa.literal(update.observed_time, UTCDateTime())
    values["publish_time"] = sa.func.coalesce(tasks.c.publish_time, observed)
    return values


def not_terminal() -> sa.ColumnElement[bool]:
    """The guard of every update: a terminal state is never overwritten."""
    return tasks.c.state.notin_(TERMINAL)
