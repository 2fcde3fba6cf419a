"""The domain's transition rule (``domain.model.TRANSITION_RULES``) as SQL.

Both store paths are generated from the one rule, never written out by hand: the
PostgreSQL batch ``UPDATE … FROM unnest(…)`` (``UNNEST_UPDATE`` with ``update_row``) and
the portable per-task UPDATEs (``portable_updates``, SQLite for ``taskgate dev``). Besides
the rule's fields, a worker's update of an unfinished task clears its outbox mark (a worker
saw it, so it was published, whatever the outbox thinks) and records the worker that
started it (``worker``: set when the update names one, never cleared by an update; the
recovery pass watches its heartbeat). A terminal row takes only the rule's ``late``
fill-ins (an earlier start, a further progress) and nothing else; a row neither unfinished
nor filled in is not written at all.
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
        f"CASE\n            WHEN {end} IS NULL THEN {start}\n"
        f"            WHEN {start} IS NULL\n                OR {start} > {end} THEN {end}\n"
        f"            ELSE {start}\n        END"
    )


def _late_sql(field: str, late: Take) -> str:
    """When the update fills ``field`` in on a terminal row (``late``: its kind of take)."""
    new = f"u.{field}::jsonb" if _is_json(field) else f"u.{field}"
    old = f"t.{field}"
    if late is Take.EARLIEST:
        further = f"{new} < {old}"
    elif late is Take.FURTHEST:
        further = f"({new} ->> 'current')::float8 > ({old} ->> 'current')::float8"
    else:
        raise ValueError(f"no late take {late} for {field}")
    condition = f"{new} IS NOT NULL AND ({old} IS NULL OR {further})"
    if field == START_FIELD:  # never a start later than the end the row already has
        condition += f" AND (t.{END_FIELD} IS NULL OR {new} <= t.{END_FIELD})"
    return f"({condition})"


_UNFINISHED = "t.state NOT IN ({})".format(", ".join(f"'{state}'" for state in TERMINAL))


def _set(rule: FieldRule) -> tuple[str, str | None]:
    """The SET clause of ``rule``'s column, and when it fills a terminal row in (None: never)."""
    field = rule.field
    value = _not_after_sql(_sql(rule)) if field == START_FIELD else _sql(rule)
    if rule.late is None:
        return f"{field} = CASE WHEN {_UNFINISHED} THEN {value} ELSE t.{field} END", None
    fill = _late_sql(field, rule.late)
    new = f"u.{field}::jsonb" if _is_json(field) else f"u.{field}"
    clause = (
        f"{field} = CASE\n        WHEN {_UNFINISHED} THEN {value}\n"
        f"        WHEN {fill} THEN {new}\n        ELSE t.{field}\n    END"
    )
    return clause, fill


def _unnest_update() -> str:
    fields = [rule.field for rule in TRANSITION_RULES]
    sets, fills = [], []
    for rule in TRANSITION_RULES:
        clause, fill = _set(rule)
        sets.append(clause)
        fills += [] if fill is None else [fill]
    for field, value in [
        ("publish_after", "NULL"),
        ("publish_time", "coalesce(t.publish_time, u.update_time)"),
        (WORKER_FIELD, f"coalesce(u.{WORKER_FIELD}, t.{WORKER_FIELD})"),
    ]:
        sets.append(f"{field} = CASE WHEN {_UNFINISHED} THEN {value} ELSE t.{field} END")
    fields.append(WORKER_FIELD)
    arrays = ["$1::varchar[]"] + [f"${i}::{_array_type(field)}[]" for i, field in enumerate(fields, 2)]
    assignments = ",\n    ".join(sets)
    written = "\n        OR ".join([_UNFINISHED, *fills])
    return f"""
UPDATE tasks AS t SET
    {assignments}
FROM unnest({", ".join(arrays)})
    AS u(task_id, {", ".join(fields)})
WHERE t.task_id = u.task_id
    AND ({written})
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


def _json_value(value: Any) -> Any:
    """A JSON field's value as the portable UPDATE binds it (as ``any_json`` for PostgreSQL)."""
    return without_nul(column_value(value))


def update_values(update: TaskUpdate) -> dict[str, Any]:
    """The column values of the portable UPDATE of one unfinished task (guarded by
    ``not_terminal``)."""
    values: dict[str, Any] = {}
    for rule in TRANSITION_RULES:
        new = incoming(update, rule.field)
        if rule.field in _JSON_FIELDS and new is not None:
            new = _json_value(new)
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


def _late_condition(field: str, late: Take, new: Any) -> sa.ColumnElement[bool]:
    """When ``new`` (not None) fills ``field`` in on a terminal row (``late``: its take)."""
    column = tasks.c[field]
    if late is Take.EARLIEST:
        value = sa.literal(new, column.type)
        further = column > value
    elif late is Take.FURTHEST:
        further = column["current"].as_float() < sa.literal(float(new.current), sa.Float())
    else:
        raise ValueError(f"no late take {late} for {field}")
    condition = sa.or_(column.is_(None), further)
    if field == START_FIELD:  # never a start later than the end the row already has
        end = tasks.c[END_FIELD]
        condition = sa.and_(condition, sa.or_(end.is_(None), end >= value))
    return condition


def late_fill_update(update: TaskUpdate) -> sa.Update | None:
    """The portable UPDATE of what ``update`` still fills in on its task's row when that row
    is terminal (the rule's ``late`` takes); None when the update brings no such value."""
    values: dict[str, Any] = {}
    conditions: list[sa.ColumnElement[bool]] = []
    for rule in TRANSITION_RULES:
        new = incoming(update, rule.field)
        if rule.late is None or new is None:
            continue
        condition = _late_condition(rule.field, rule.late, new)
        value = _json_value(new) if rule.field in _JSON_FIELDS else new
        column = tasks.c[rule.field]
        values[rule.field] = sa.case((condition, sa.literal(value, column.type)), else_=column)
        conditions.append(condition)
    if not values:
        return None
    where = [tasks.c.task_id == update.task_id, tasks.c.state.in_(TERMINAL), sa.or_(*conditions)]
    return tasks.update().where(*where).values(values)


def portable_updates(update: TaskUpdate) -> list[sa.Update]:
    """The portable UPDATEs of one task, run in this order: the late fill-ins of a row that
    is already terminal (``late_fill_update``), then the rule's UPDATE of an unfinished row.
    At most one of them changes the row: the first only a terminal row, which the second
    never touches."""
    normal = (
        tasks.update().where(tasks.c.task_id == update.task_id, not_terminal()).values(update_values(update))
    )
    late = late_fill_update(update)
    return [normal] if late is None else [late, normal]


def not_terminal() -> sa.ColumnElement[bool]:
    """The guard of every update of an unfinished task: a terminal state is never overwritten."""
    return tasks.c.state.notin_(TERMINAL)
