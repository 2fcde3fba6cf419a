"""The durable record of every task: SQLAlchemy Core tables and the task store.

The store knows SQL and nothing of gRPC or Celery. Each method runs in one transaction of
its own. Connection failures surface as ``DatabaseUnavailable``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from service.domain.errors import DatabaseUnavailable, RequestIdConflict
from service.domain.model import (
    TERMINAL_STATES,
    Delivery,
    Progress,
    TaskError,
    TaskRecord,
    TaskState,
    TaskUpdate,
)
from service.store.group_commit import GroupCommit

log = logging.getLogger(__name__)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timestamp that always comes back as an aware UTC datetime (SQLite too)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSONType = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
_TERMINAL = [state.value for state in TERMINAL_STATES]

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("task_name", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("queue", sa.String(255), nullable=False, server_default=""),
    sa.Column("args", JSONType, nullable=False),
    sa.Column("kwargs", JSONType, nullable=False),
    sa.Column("options", JSONType, nullable=False),
    sa.Column("caller", sa.String(255), nullable=False, server_default=""),
    sa.Column("request_id", sa.String(255), nullable=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("progress", JSONType, nullable=True),
    sa.Column("result", JSONType, nullable=True),
    sa.Column("error", JSONType, nullable=True),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("create_time", UTCDateTime, nullable=False),
    sa.Column("run_time", UTCDateTime, nullable=False),
    sa.Column("update_time", UTCDateTime, nullable=False),
    sa.Column("start_time", UTCDateTime, nullable=True),
    sa.Column("end_time", UTCDateTime, nullable=True),
    # The outbox: a task with publish_after set still has to be handed to the broker,
    # no earlier than that time (a due time, or the lease of whoever is publishing it).
    sa.Column("publish_after", UTCDateTime, nullable=True),
    sa.Column("publish_time", UTCDateTime, nullable=True),
    sa.Column("publish_attempts", sa.Integer, nullable=False, server_default="0"),
)
sa.Index(
    "ix_tasks_outbox",
    tasks.c.publish_after,
    postgresql_where=tasks.c.publish_after.isnot(None),
    sqlite_where=tasks.c.publish_after.isnot(None),
)
sa.Index("ix_tasks_caller_request_id", tasks.c.caller, tasks.c.request_id, unique=True)
sa.Index(
    "ix_tasks_active",
    tasks.c.update_time,
    postgresql_where=tasks.c.state.notin_(_TERMINAL),
    sqlite_where=tasks.c.state.notin_(_TERMINAL),
)

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    OSError,
    TimeoutError,
)


def _options_of(delivery: Delivery) -> dict[str, Any]:
    expire = delivery.expire_time.isoformat() if delivery.expire_time else None
    return {"priority": delivery.priority, "expire_time": expire, "headers": delivery.headers}


def _delivery(row: RowMapping) -> Delivery:
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
    )


def _record(row: Mapping[Any, Any]) -> TaskRecord:
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
    )


def _update_values(update: TaskUpdate) -> dict[str, Any]:
    """The column values an update writes; mirrors ``domain.apply_update``."""
    values: dict[str, Any] = {
        "state": update.state.value,
        "update_time": update.observed_time,
        "error": None if update.error is None else vars_of(update.error),
        # a worker saw it, so it was published, whatever the outbox thinks
        "publish_after": None,
        "publish_time": sa.func.coalesce(tasks.c.publish_time, update.observed_time),
    }
    if update.progress is not None:
        values["progress"] = vars_of(update.progress)
    if update.retries is not None:
        values["retries"] = update.retries
    if update.start_time is not None:
        values["start_time"] = sa.func.coalesce(tasks.c.start_time, update.start_time)
    if update.state is TaskState.SUCCEEDED:
        values["result"] = update.result
    if update.state.terminal:
        end_time = update.end_time or update.observed_time
        values["end_time"] = end_time
        start = values.get("start_time", tasks.c.start_time)
        values["start_time"] = sa.case(
            (sa.or_(tasks.c.start_time.is_(None), tasks.c.start_time > end_time), end_time),
            else_=start,
        )
    return values


_SELECT_ONE = f"SELECT {', '.join(tasks.c.keys())} FROM tasks WHERE task_id = $1"

_MARK_PUBLISHED = """
UPDATE tasks SET publish_after = NULL, publish_time = coalesce(publish_time, $2)
WHERE task_id IN (SELECT task_id FROM tasks WHERE task_id = ANY($1::varchar[]) ORDER BY task_id FOR UPDATE)
"""

_UNNEST_UPDATE = f"""
UPDATE tasks AS t SET
    state = u.state,
    update_time = u.observed,
    error = u.error::jsonb,
    publish_after = NULL,
    publish_time = coalesce(t.publish_time, u.observed),
    progress = coalesce(u.progress::jsonb, t.progress),
    retries = coalesce(u.retries, t.retries),
    result = CASE WHEN u.state = 'SUCCEEDED' THEN u.result::jsonb ELSE t.result END,
    end_time = coalesce(u.end_time, t.end_time),
    start_time = CASE
        WHEN u.end_time IS NULL THEN coalesce(t.start_time, u.start_time)
        WHEN coalesce(t.start_time, u.start_time) IS NULL
            OR coalesce(t.start_time, u.start_time) > u.end_time THEN u.end_time
        ELSE coalesce(t.start_time, u.start_time)
    END
FROM unnest($1::varchar[], $2::varchar[], $3::timestamptz[], $4::text[], $5::text[], $6::int[],
            $7::text[], $8::timestamptz[], $9::timestamptz[])
    AS u(task_id, state, observed, error, progress, retries, result, end_time, start_time)
WHERE t.task_id = u.task_id AND t.state NOT IN ({", ".join(f"'{state}'" for state in _TERMINAL)})
    -- rows are locked in task_id order, as every other multi-row UPDATE here does: two
    -- statements over the same tasks then wait for each other instead of deadlocking
    AND t.task_id IN (SELECT task_id FROM tasks WHERE task_id = ANY($1) ORDER BY task_id FOR UPDATE)
"""


def _locked_in_order(task_ids: Sequence[str]) -> sa.Select[tuple[str]]:
    """The rows of ``task_ids``, locked in task_id order (see ``_UNNEST_UPDATE``)."""
    return (
        sa.select(tasks.c.task_id)
        .where(tasks.c.task_id.in_(list(task_ids)))
        .order_by(tasks.c.task_id)
        .with_for_update()
    )


def _columns(rows: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows of ``width`` values as ``width`` column lists (the arrays of an ``unnest``)."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for values, value in zip(columns, row, strict=True):
            values.append(value)
    return columns


#: Values per row of ``_update_row`` (the arrays of ``_UNNEST_UPDATE``).
_UPDATE_WIDTH = 9


def _update_row(update: TaskUpdate) -> tuple[Any, ...]:
    """One update in ``_UNNEST_UPDATE``'s column order; mirrors ``_update_values``."""
    terminal = update.state.terminal
    succeeded = update.state is TaskState.SUCCEEDED
    return (
        update.task_id,
        update.state.value,
        update.observed_time,
        None if update.error is None else _any_json(vars_of(update.error)),
        None if update.progress is None else _any_json(vars_of(update.progress)),
        update.retries,
        # results are whatever the task returned, decoded by json: keep json for them
        _any_json(update.result) if succeeded and update.result is not None else None,
        (update.end_time or update.observed_time) if terminal else None,
        update.start_time,
    )


def vars_of(obj: Progress | TaskError) -> dict[str, Any]:
    """A frozen dataclass with slots as a plain dict for a JSON column."""
    return {name: getattr(obj, name) for name in obj.__slots__}


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
    #: when the outbox may publish it (the fast path's lease, or a held task's due time)
    publish_after: dt.datetime
    #: kept in the database until it is due (not handed to the fast path)
    held: bool

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
        )


_INSERT_COLUMNS: tuple[tuple[str, str], ...] = (
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
)
_INSERT_NAMES = [name for name, _ in _INSERT_COLUMNS]
#: From this many rows on, binary COPY beats one INSERT … unnest: about half the cost per row
#: (measured: 2.6 against 5.5 ms for 500 rows), for one more round trip.
COPY_FROM = 64
_UNNEST_INSERT = "INSERT INTO tasks ({names}) SELECT {casts} FROM unnest({arrays}) AS t({names})".format(
    names=", ".join(name for name, _ in _INSERT_COLUMNS),
    # JSON travels as text and is cast per row; the other types go as typed arrays
    casts=", ".join(f"t.{name}::jsonb" if kind == "jsonb" else f"t.{name}" for name, kind in _INSERT_COLUMNS),
    arrays=", ".join(
        f"${i}::{'text' if kind == 'jsonb' else kind}[]" for i, (_, kind) in enumerate(_INSERT_COLUMNS, 1)
    ),
)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _any_json(value: Any) -> str:
    """JSON of a value decoded from a worker's document: orjson, or the json module for what
    orjson refuses (integers beyond 64 bits). PostgreSQL cannot store U+0000 in jsonb: it
    becomes U+FFFD (the replacement character)."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = json.dumps(value)
    if "\\u0000" in text:
        return _any_json(_without_nul(value))
    return text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value


def _row(new: NewTask) -> dict[str, Any]:
    """The row as SQLAlchemy column values."""
    return dict(zip((name for name, _ in _INSERT_COLUMNS), _row_values(new, encode=False), strict=True))


def _row_values(new: NewTask, *, encode: bool = True) -> tuple[Any, ...]:
    """The row in ``_INSERT_COLUMNS`` order; JSON encoded for the unnest INSERT if ``encode``."""
    delivery = new.delivery
    json_of = _json if encode else _same
    return (
        delivery.task_id,
        delivery.task_name,
        new.state.value,
        delivery.queue,
        json_of(delivery.args),
        json_of(delivery.kwargs),
        json_of(_options_of(delivery)),
        new.caller,
        new.request_id or None,
        new.fingerprint,
        new.create_time,
        delivery.run_time,
        new.create_time,
        new.publish_after,
    )


def _same(value: Any) -> Any:
    return value


class TaskStore:
    """Reads and writes task records."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        #: PostgreSQL takes the driver-level statements; any other database (SQLite for
        #: ``taskgate dev``) SQLAlchemy's portable ones
        self._postgres = engine.dialect.name == "postgresql"
        self._group_insert: GroupCommit[NewTask] = GroupCommit(self._insert_many)
        #: the group commit's own connection (PostgreSQL), kept across flushes: one flush
        #: runs at a time, and a pool checkout per flush costs more than the INSERT's Python
        self._flush_conn: AsyncConnection | None = None

    @classmethod
    def connect(cls, url: str, *, pool_size: int = 10) -> TaskStore:
        """A store on a new engine for ``url`` (``postgresql+asyncpg://`` or ``sqlite+aiosqlite://``)."""
        # No pre-ping: it costs a round trip per transaction. A connection the server
        # dropped fails its next statement, is discarded by the pool, and the call
        # answers UNAVAILABLE (retryable) instead.
        kwargs: dict[str, Any] = {}
        if url.startswith("postgresql"):
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=10)
            kwargs["connect_args"] = {"timeout": 5}
        elif url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}  # wait for the writer lock instead of failing
        return cls(create_async_engine(url, **kwargs))

    @property
    def engine(self) -> AsyncEngine:
        """The engine, for migrations and health checks."""
        return self._engine

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._flush_conn is not None:
            with contextlib.suppress(Exception):
                await self._flush_conn.close()
            self._flush_conn = None
        await self._engine.dispose()

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        async with self._connection_errors(), self._engine.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _one_statement(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one raw statement: on PostgreSQL outside any transaction (the
        statement commits by itself: one round trip instead of BEGIN, statement, COMMIT);
        elsewhere a transaction as ``_begin``."""
        if not self._postgres:
            async with self._begin() as conn:
                yield conn
            return
        async with self._connection_errors(), self._engine.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _connection_errors(self) -> AsyncIterator[None]:
        """Connection failures inside the block become DatabaseUnavailable."""
        try:
            yield
        except _CONNECTION_ERRORS as exc:
            if isinstance(exc, sa.exc.DBAPIError) and not _is_connection_error(exc):
                raise
            log.warning("database unreachable: %s", type(exc).__name__)
            raise DatabaseUnavailable("the task database is unreachable; retry later") from exc

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless the database answers."""
        async with self._begin() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def insert(self, new: NewTask) -> TaskRecord | None:
        """Record a new task and its outbox mark in one transaction.

        Concurrent inserts without a request_id are committed together (group commit).

        Returns:
            None for a new task; the original's record when the caller's request_id was
            used before with the same fingerprint (nothing is recorded then).

        Raises:
            RequestIdConflict: the request_id was used before with another request.
        """
        if not new.request_id:
            await self._group_insert.submit(new)
            return None
        async with self._begin() as conn:
            existing = await self._by_request_id(conn, new.caller, new.request_id)
            if existing is not None:
                return self._same_request(existing, new.fingerprint)
            try:
                async with conn.begin_nested():
                    await self._insert_rows(conn, [new])
            except sa.exc.IntegrityError:
                existing = await self._by_request_id(conn, new.caller, new.request_id)
                if existing is None:
                    raise
                return self._same_request(existing, new.fingerprint)
        return None

    async def insert_batch(self, news: Sequence[NewTask], *, request_id: str = "") -> list[TaskRecord] | None:
        """Record several tasks in one transaction: all of them, or (on any error) none.

        When the tasks carry request_ids (one batch request_id, one per task), a batch
        whose request_ids all exist with the same fingerprints is a repeat.

        Returns:
            None for new tasks; the originals' records, in order, for a repeat.

        Raises:
            RequestIdConflict: some of the request_ids exist, or exist for other requests.
        """
        if not news:
            return None
        if not news[0].request_id:
            async with self._one_statement() as conn:
                await self._insert_rows(conn, news)
            return None
        async with self._begin() as conn:
            existing = await self._existing_batch(conn, news, request_id)
            if existing is not None:
                return existing
            try:
                async with conn.begin_nested():
                    await self._insert_rows(conn, news)
            except sa.exc.IntegrityError:
                existing = await self._existing_batch(conn, news, request_id)
                if existing is None:
                    raise
                return existing
        return None

    async def _existing_batch(
        self, conn: AsyncConnection, news: Sequence[NewTask], request_id: str
    ) -> list[TaskRecord] | None:
        """The originals of a repeated batch; None if none of its request_ids exist."""
        caller = news[0].caller
        wanted = {new.request_id: new for new in news}
        query = sa.select(tasks).where(tasks.c.caller == caller, tasks.c.request_id.in_(list(wanted)))
        rows = {row["request_id"]: row for row in (await conn.execute(query)).mappings()}
        if not rows:
            return None
        same = len(rows) == len(wanted) and all(
            rows[key]["fingerprint"] == new.fingerprint for key, new in wanted.items()
        )
        if not same:
            raise RequestIdConflict(
                f"request_id {request_id!r} was already used for a different batch; "
                "use a new request_id for a new batch"
            )
        return [_record(rows[new.request_id]) for new in news]

    async def _insert_many(self, news: Sequence[NewTask]) -> None:
        """One INSERT for many rows, atomic by itself (the group commit's flush)."""
        if not self._postgres:
            async with self._begin() as conn:
                await self._insert_rows(conn, news)
            return
        if self._flush_conn is None or self._flush_conn.closed or self._flush_conn.invalidated:
            async with self._connection_errors():
                self._flush_conn = await self._engine.connect()
        try:
            await self._insert_rows(self._flush_conn, news)
        except BaseException:
            # a failed or cancelled statement leaves the connection in doubt: start afresh
            conn, self._flush_conn = self._flush_conn, None
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise

    async def _insert_rows(self, conn: AsyncConnection, news: Sequence[NewTask]) -> None:
        """INSERT rows on the caller's connection (in its transaction, if it has one): on
        PostgreSQL one ``unnest`` statement with one array per column (asyncpg encodes them in
        C), or binary COPY from ``COPY_FROM`` rows on; elsewhere executemany. Either way one
        statement: all rows or none."""
        if not self._postgres:
            await conn.execute(tasks.insert(), [_row(new) for new in news])
            return
        if len(news) >= COPY_FROM:
            records = [_row_values(new) for new in news]
            await _on_driver(
                conn,
                "COPY tasks",
                lambda driver: driver.copy_records_to_table("tasks", records=records, columns=_INSERT_NAMES),
            )
            return
        columns = _columns((_row_values(new) for new in news), len(_INSERT_COLUMNS))
        await _driver_execute(conn, _UNNEST_INSERT, *columns)

    async def _by_request_id(self, conn: AsyncConnection, caller: str, request_id: str) -> RowMapping | None:
        query = sa.select(tasks).where(tasks.c.caller == caller, tasks.c.request_id == request_id)
        return (await conn.execute(query)).mappings().first()

    @staticmethod
    def _same_request(row: RowMapping, fingerprint: str) -> TaskRecord:
        if row["fingerprint"] != fingerprint:
            raise RequestIdConflict(
                f"request_id {row['request_id']!r} was already used for a different request "
                f"(task {row['task_id']}); use a new request_id for a new task"
            )
        return _record(row)

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task with this id, or None.

        On PostgreSQL one self-committing statement on the driver (one round trip, not
        BEGIN, SELECT, COMMIT: every GetStatus and every stream opened reads a task).
        """
        row: Mapping[Any, Any] | None
        if self._postgres:
            async with self._one_statement() as conn:
                row = await _driver_fetchrow(conn, _SELECT_ONE, task_id)
        else:
            async with self._begin() as conn:
                query = sa.select(tasks).where(tasks.c.task_id == task_id)
                row = (await conn.execute(query)).mappings().first()
        return None if row is None else _record(row)

    async def apply_updates(self, updates: Iterable[TaskUpdate]) -> int:
        """Write state changes; a terminal state is never overwritten. Returns rows changed.

        At most one update per task (the recorder coalesces them). On PostgreSQL the whole
        batch is one ``UPDATE … FROM unnest(…)``; elsewhere one UPDATE per task.
        """
        updates = list(updates)
        if not updates:
            return 0
        if self._postgres:
            columns = _columns((_update_row(update) for update in updates), _UPDATE_WIDTH)
            async with self._one_statement() as conn:  # one statement: atomic by itself
                status = await _driver_execute(conn, _UNNEST_UPDATE, *columns)
            return int(status.rsplit(" ", 1)[-1])
        changed = 0
        async with self._begin() as conn:
            for update in updates:
                statement = (
                    tasks.update()
                    .where(tasks.c.task_id == update.task_id, tasks.c.state.notin_(_TERMINAL))
                    .values(_update_values(update))
                )
                changed += (await conn.execute(statement)).rowcount
        return changed

    async def claim_due(self, now: dt.datetime, *, lease: dt.timedelta, limit: int) -> list[Delivery]:
        """Take up to ``limit`` tasks due for publishing, leasing them to the caller.

        Rows another process has locked are skipped (``FOR UPDATE SKIP LOCKED``), and the
        lease keeps other replicas off them until it runs out.
        """
        async with self._begin() as conn:
            query = (
                sa.select(tasks)
                .where(tasks.c.publish_after <= now)
                .order_by(tasks.c.publish_after)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            rows = (await conn.execute(query)).mappings().all()
            if not rows:
                return []
            ids = [row["task_id"] for row in rows]
            await conn.execute(
                tasks.update()
                .where(tasks.c.task_id.in_(ids))
                .values(publish_after=now + lease, publish_attempts=tasks.c.publish_attempts + 1)
            )
        return [_delivery(row) for row in rows]

    async def mark_published(self, task_ids: Sequence[str], now: dt.datetime) -> None:
        """Clear the outbox mark of tasks the broker accepted.

        On PostgreSQL one self-committing statement on the driver, the ids as one array:
        SQLAlchemy's expanding ``IN`` rewrites the statement for each of up to 500 ids (a
        watchdog caught the event loop 8 ms into one such rewrite under EnqueueBatch load).
        """
        if not task_ids:
            return
        if self._postgres:
            async with self._one_statement() as conn:
                await _driver_execute(conn, _MARK_PUBLISHED, list(task_ids), now)
            return
        async with self._begin() as conn:
            await conn.execute(
                tasks.update()
                .where(tasks.c.task_id.in_(_locked_in_order(task_ids)))
                .values(publish_after=None, publish_time=sa.func.coalesce(tasks.c.publish_time, now))
            )

    async def retry_publish_at(self, task_ids: Sequence[str], when: dt.datetime) -> None:
        """Put tasks whose publishing failed back in the outbox, due at ``when``."""
        if not task_ids:
            return
        async with self._begin() as conn:
            await conn.execute(
                tasks.update()
                .where(tasks.c.task_id.in_(_locked_in_order(task_ids)), tasks.c.publish_after.isnot(None))
                .values(publish_after=when)
            )

    async def active_ids(self, limit: int) -> list[str]:
        """Ids of published tasks not yet terminal, least recently updated first."""
        async with self._begin() as conn:
            query = (
                sa.select(tasks.c.task_id)
                .where(tasks.c.state.notin_(_TERMINAL), tasks.c.publish_time.isnot(None))
                .order_by(tasks.c.update_time)
                .limit(limit)
            )
            return list((await conn.execute(query)).scalars())


_DRIVER_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


async def _driver_execute(conn: AsyncConnection, statement: str, *args: Any) -> str:
    """Run ``statement`` on the asyncpg connection under ``conn`` (see ``_on_driver``)."""
    status: str = await _on_driver(conn, statement, lambda driver: driver.execute(statement, *args))
    return status


async def _driver_fetchrow(conn: AsyncConnection, statement: str, *args: Any) -> Mapping[Any, Any] | None:
    """The first row of ``statement`` on the asyncpg connection under ``conn``, or None."""
    row: Mapping[Any, Any] | None = await _on_driver(
        conn, statement, lambda driver: driver.fetchrow(statement, *args)
    )
    return row


async def _on_driver(conn: AsyncConnection, what: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """``call`` the asyncpg connection under ``conn``, bypassing SQLAlchemy's statement layer
    (for the hot paths), with asyncpg's errors mapped as SQLAlchemy's are.

    Raises:
        sa.exc.IntegrityError: a unique constraint was violated.
        DatabaseUnavailable: the connection failed (it is discarded from the pool).
    """
    raw = await conn.get_raw_connection()
    try:
        return await call(raw.driver_connection)
    except asyncpg.UniqueViolationError as exc:
        raise sa.exc.IntegrityError(what, None, exc) from exc
    except _DRIVER_CONNECTION_ERRORS as exc:
        await conn.invalidate()
        log.warning("database unreachable: %s", type(exc).__name__)
        raise DatabaseUnavailable("the task database is unreachable; retry later") from exc


def _is_connection_error(exc: sa.exc.DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
