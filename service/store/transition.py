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

Updates from the state feed carry their entry's position in the stream (``feed_position``),
and replicas may write a task's entries out of order: an unfinished row whose last feed
position is newer than a non-terminal update's takes from it only what a terminal row would
(the late fill-ins), plus its worker and the outbox fields (a STARTED overtaken by its first
progress still names the worker the recovery pass must watch), in both store paths.
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
#: The column (and ``TaskUpdate`` field) of the state feed's position of the newest state
#: from the feed a task has taken.
POSITION_FIELD = "feed_position"


def _is_json(field: str) -> bool:
    return isinstance(tasks.c[field].type, sa.JSON)


def _array_type(field: str) -> str:
    """The PostgreSQL array element type a field travels as (JSON as text, cast per row)."""
    kind = tasks.c[field].type
    if isinstance(kind, sa.JSON):
        return "text"
    if isinstance(kind, sa.BigInteger):
        return "bigint"
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


_TERMINAL_LIST = ", ".join(f"'{state}'" for state in TERMINAL)
_UNFINISHED = f"t.state NOT IN ({_TERMINAL_LIST})"
#: The update is not older than what the row has taken from the state feed (a terminal state
#: always counts as news: the rule itself keeps it from being overwritten).
_FRESH = (
    f"(u.{POSITION_FIELD} IS NULL OR t.{POSITION_FIELD} IS NULL OR u.{POSITION_FIELD} > t.{POSITION_FIELD}"
    f" OR u.state IN ({_TERMINAL_LIST}))"
)
#: The row takes the update by the rule: unfinished, and the update not older than its last.
#: Otherwise (terminal, or a feed entry older than one already taken) only the late fill-ins.
_TAKES = f"({_UNFINISHED} AND {_FRESH})"


def _set(rule: FieldRule) -> tuple[str, str | None]:
    """The SET clause of ``rule``'s column, and when it fills a terminal row in (None: never)."""
    field = rule.field
    value = _not_after_sql(_sql(rule)) if field == START_FIELD else _sql(rule)
    if rule.late is None:
        return f"{field} = CASE WHEN {_TAKES} THEN {value} ELSE t.{field} END", None
    fill = _late_sql(field, rule.late)
    new = f"u.{field}::jsonb" if _is_json(field) else f"u.{field}"
    clause = (
        f"{field} = CASE\n        WHEN {_TAKES} THEN {value}\n"
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
    position = f"greatest(t.{POSITION_FIELD}, u.{POSITION_FIELD})"
    sets.append(f"{POSITION_FIELD} = CASE WHEN {_TAKES} THEN {position} ELSE t.{POSITION_FIELD} END")
    fields += [WORKER_FIELD, POSITION_FIELD]
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
#: Values per row of ``update_row``: the task_id, the rule's fields, the worker, the position.
UPDATE_WIDTH = 3 + len(TRANSITION_RULES)
_JSON_FIELDS = frozenset(rule.field for rule in TRANSITION_RULES if _is_json(rule.field))


def update_row(update: TaskUpdate) -> tuple[Any, ...]:
    """One update in ``UNNEST_UPDATE``'s array order: the task_id, then what it brings for
    each field of the rule (JSON encoded; a result only with SUCCEEDED, where it is used),
    then its worker and its feed position."""
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
    values.append(update.feed_position)
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
    if update.feed_position is not None:  # the row took it (``takes``): never an older one
        column = tasks.c[POSITION_FIELD]
        bigger = sa.or_(column.is_(None), column < update.feed_position)
        values[POSITION_FIELD] = sa.case((bigger, update.feed_position), else_=column)
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
    """The portable UPDATE of a row that does not take ``update`` by the rule (``takes``):
    a terminal row takes the rule's ``late`` fill-ins, and an unfinished row the update is
    older than (a feed entry) takes them too, plus the worker and the outbox fields, as
    ``UNNEST_UPDATE`` writes it; None when the update can change no such row."""
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
    filled = sa.and_(tasks.c.state.in_(TERMINAL), sa.or_(*conditions)) if conditions else None
    stale = _stale(update)
    if stale is not None:
        unfinished = not_terminal()
        if update.worker is not None:
            worker = tasks.c[WORKER_FIELD]
            values[WORKER_FIELD] = sa.case((unfinished, update.worker), else_=worker)
        observed = sa.literal(update.observed_time, UTCDateTime())
        values["publish_after"] = sa.case((unfinished, None), else_=tasks.c.publish_after)
        values["publish_time"] = sa.case(
            (unfinished, sa.func.coalesce(tasks.c.publish_time, observed)), else_=tasks.c.publish_time
        )
    written = [where for where in (filled, stale) if where is not None]
    if not written:
        return None
    return tasks.update().where(tasks.c.task_id == update.task_id, sa.or_(*written)).values(values)


def _stale(update: TaskUpdate) -> sa.ColumnElement[bool] | None:
    """When an unfinished row has taken a newer feed entry than ``update`` (None: ``update``
    is terminal or not from the feed, and cannot be older)."""
    position = _ordered_position(update)
    if position is None:
        return None
    return sa.and_(not_terminal(), tasks.c[POSITION_FIELD] >= position)


def _ordered_position(update: TaskUpdate) -> int | None:
    """The feed position ``update`` is ordered by: None for an update not from the feed and
    for a terminal one (always news: the rule keeps it from being overwritten)."""
    return None if update.state.terminal else update.feed_position


def portable_updates(update: TaskUpdate) -> list[sa.Update]:
    """The portable UPDATEs of one task, run in this order: the late fill-ins of a row that
    does not take the update by the rule (``late_fill_update``), then the rule's UPDATE of a
    row that takes it (``takes``). At most one of them changes the row: the first only a
    row the second never touches."""
    normal = (
        tasks.update().where(tasks.c.task_id == update.task_id, takes(update)).values(update_values(update))
    )
    late = late_fill_update(update)
    return [normal] if late is None else [late, normal]


def takes(update: TaskUpdate) -> sa.ColumnElement[bool]:
    """When a row takes ``update`` by the rule: unfinished and, for an update from the state
    feed that is not terminal, not older than the newest feed entry the row has taken
    (``_TAKES`` of the PostgreSQL statement)."""
    position = _ordered_position(update)
    if position is None:
        return not_terminal()
    column = tasks.c[POSITION_FIELD]
    return sa.and_(not_terminal(), sa.or_(column.is_(None), column < position))


def not_terminal() -> sa.ColumnElement[bool]:
    """The guard of every update of an unfinished task: a terminal state is never overwritten."""
    return tasks.c.state.notin_(TERMINAL)
