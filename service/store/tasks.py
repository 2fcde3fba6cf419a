"""The task store: the durable record of every task, on PostgreSQL or SQLite.

The store knows SQL and nothing of gRPC or Celery. Each method runs in one transaction of
its own. On PostgreSQL the hot paths go straight to asyncpg (``postgres.py``); on any
other database (SQLite for ``taskgate dev``) SQLAlchemy's portable statements run.
Failures surface as ``DatabaseUnavailable`` (no connection: retry) or
``StatementRejected`` (the database refused the statement); see ``errors.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from service.domain.errors import RequestIdConflict
from service.domain.model import Delivery, TaskRecord, TaskUpdate
from service.store import postgres
from service.store.base import ActiveKey
from service.store.errors import connecting, statement_errors, unavailable
from service.store.group_commit import GroupCommit
from service.store.postgres import COPY_FROM
from service.store.rows import NewTask, delivery_of, insert_row, record_of
from service.store.tables import TERMINAL, JSONType, UTCDateTime, metadata, tasks
from service.store.transition import UNNEST_UPDATE, UPDATE_WIDTH, portable_updates, update_row

__all__ = ["COPY_FROM", "JSONType", "NewTask", "TaskStore", "UTCDateTime", "metadata", "tasks"]


def _locked_in_order(task_ids: Sequence[str]) -> sa.Select[tuple[str]]:
    """The rows of ``task_ids``, locked in task_id order (as ``UNNEST_UPDATE`` locks them)."""
    return (
        sa.select(tasks.c.task_id)
        .where(tasks.c.task_id.in_(list(task_ids)))
        .order_by(tasks.c.task_id)
        .with_for_update()
    )


def _unnamed_statement() -> str:
    return ""


#: asyncpg behind PgBouncer's transaction pooling, where consecutive transactions may run on
#: different server connections: no named prepared statement may outlive its transaction.
#: asyncpg caches none (``statement_cache_size=0``: the driver calls of ``postgres.py``),
#: nor does SQLAlchemy, and SQLAlchemy's statements use the unnamed one (``""``), which the
#: next statement replaces (no collisions between clients, nothing left on the server).
#: Cost: every statement is parsed and planned again (one Parse more per call).
PGBOUNCER_ARGS: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": _unnamed_statement,
}


class TaskStore:
    """Reads and writes task records."""

    def __init__(self, engine: AsyncEngine, *, fast_paths: bool = True) -> None:
        """A store on ``engine``.

        Args:
            engine: The database's engine (``postgresql+asyncpg`` or ``sqlite+aiosqlite``).
            fast_paths: Use the asyncpg statements on PostgreSQL (False: the portable ones,
                to test them on PostgreSQL too).
        """
        self._engine = engine
        #: PostgreSQL takes the driver-level statements; any other database (SQLite for
        #: ``taskgate dev``) SQLAlchemy's portable ones
        self._postgres = fast_paths and engine.dialect.name == "postgresql"
        self._group_insert: GroupCommit[NewTask] = GroupCommit(self._insert_many)
        #: the group commit's own connection (PostgreSQL), kept across flushes: one flush
        #: runs at a time, and a pool checkout per flush costs more than the INSERT's Python
        self._flush_conn: AsyncConnection | None = None

    @classmethod
    def connect(
        cls, url: str, *, pool_size: int = 10, fast_paths: bool = True, pgbouncer: bool = False
    ) -> TaskStore:
        """A store on a new engine for ``url`` (``postgresql+asyncpg://`` or ``sqlite+aiosqlite://``).

        ``pgbouncer``: the URL is a PgBouncer in transaction pooling mode (``PGBOUNCER_ARGS``).
        """
        # No pre-ping: it costs a round trip per transaction. A connection the server
        # dropped fails its next statement, is discarded by the pool, and the call
        # answers UNAVAILABLE (retryable) instead.
        kwargs: dict[str, Any] = {}
        if url.startswith("postgresql"):
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=10)
            kwargs["connect_args"] = {"timeout": 5, **(PGBOUNCER_ARGS if pgbouncer else {})}
        elif url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}  # wait for the writer lock instead of failing
        return cls(create_async_engine(url, **kwargs), fast_paths=fast_paths)

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
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection; any failure to obtain it is ``DatabaseUnavailable``, any
        failure of what runs on it is mapped by ``statement_errors``."""
        with statement_errors():
            connected = False
            try:
                async with self._engine.connect() as conn:
                    connected = True
                    yield conn
            except Exception as exc:
                if connected:
                    raise
                raise unavailable(exc) from exc

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed when the block ends without error."""
        async with self._connect() as conn, conn.begin():
            yield conn

    @contextlib.asynccontextmanager
    async def _one_statement(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one raw statement: on PostgreSQL outside any transaction (the
        statement commits by itself: one round trip instead of BEGIN, statement, COMMIT);
        elsewhere a transaction as ``_begin``."""
        context = self._connect() if self._postgres else self._begin()
        async with context as conn:
            yield conn

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
        return [record_of(rows[new.request_id]) for new in news]

    async def _insert_many(self, news: Sequence[NewTask]) -> None:
        """One INSERT for many rows, atomic by itself (the group commit's flush)."""
        if not self._postgres:
            async with self._begin() as conn:
                await self._insert_rows(conn, news)
            return
        if self._flush_conn is None or self._flush_conn.closed or self._flush_conn.invalidated:
            with connecting():
                self._flush_conn = await self._engine.connect()
        try:
            with statement_errors():
                await self._insert_rows(self._flush_conn, news)
        except BaseException:
            # a failed or cancelled statement leaves the connection in doubt: start afresh
            conn, self._flush_conn = self._flush_conn, None
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise

    async def _insert_rows(self, conn: AsyncConnection, news: Sequence[NewTask]) -> None:
        """INSERT rows on the caller's connection (in its transaction, if it has one): on
        PostgreSQL the driver's statements (``postgres.insert_rows``), elsewhere executemany.
        Either way one statement: all rows or none."""
        if self._postgres:
            await postgres.insert_rows(conn, news)
        else:
            await conn.execute(tasks.insert(), [insert_row(new) for new in news])

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
        return record_of(row)

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task with this id, or None.

        On PostgreSQL one self-committing statement on the driver (one round trip, not
        BEGIN, SELECT, COMMIT: every GetStatus and every stream opened reads a task).
        """
        row: Mapping[Any, Any] | None
        if self._postgres:
            async with self._one_statement() as conn:
                row = await postgres.driver_fetchrow(conn, postgres.SELECT_ONE, task_id)
        else:
            async with self._begin() as conn:
                query = sa.select(tasks).where(tasks.c.task_id == task_id)
                row = (await conn.execute(query)).mappings().first()
        return None if row is None else record_of(row)

    async def apply_updates(self, updates: Iterable[TaskUpdate]) -> int:
        """Write state changes by the domain's transition rule (``transition.py``): a
        terminal state is never overwritten (a late start or progress may still fill it in),
        times are never inverted. Returns rows changed.

        At most one update per task (the recorder coalesces them). On PostgreSQL the whole
        batch is one ``UPDATE … FROM unnest(…)``; elsewhere one UPDATE per task.
        """
        updates = list(updates)
        if not updates:
            return 0
        if self._postgres:
            arrays = postgres.columns((update_row(update) for update in updates), UPDATE_WIDTH)
            async with self._one_statement() as conn:  # one statement: atomic by itself
                status = await postgres.driver_execute(conn, UNNEST_UPDATE, *arrays)
            return int(status.rsplit(" ", 1)[-1])
        changed = 0
        async with self._begin() as conn:
            for update in updates:
                for statement in portable_updates(update):
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
        return [delivery_of(row) for row in rows]

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
                await postgres.driver_execute(conn, postgres.MARK_PUBLISHED, list(task_ids), now)
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
                .where(tasks.c.state.notin_(TERMINAL), tasks.c.publish_time.isnot(None))
                .order_by(tasks.c.update_time)
                .limit(limit)
            )
            return list((await conn.execute(query)).scalars())

    async def active_page(
        self, after: ActiveKey | None, limit: int, *, updated_before: dt.datetime
    ) -> list[ActiveKey]:
        """Published tasks not yet terminal, in ``(update_time, task_id)`` order, from just
        after ``after``: one page of a keyset walk over every unfinished task.

        Only tasks last updated no later than ``updated_before`` are listed: a walk that
        passes the time it started at every page ends, whatever is being updated meanwhile
        (a task updated during the walk was just heard of; it moves past that bound). The
        partial index ``ix_tasks_active`` serves it: a page reads its own rows, not the ones
        before it, and never a finished task.
        """
        updated = tasks.c.update_time
        where = [tasks.c.state.notin_(TERMINAL), tasks.c.publish_time.isnot(None), updated <= updated_before]
        if after is not None:
            later = sa.or_(updated > after.update_time, tasks.c.task_id > after.task_id)
            where += [updated >= after.update_time, later]
        query = (
            sa.select(updated, tasks.c.task_id).where(*where).order_by(updated, tasks.c.task_id).limit(limit)
        )
        async with self._begin() as conn:
            return [ActiveKey(row.update_time, row.task_id) for row in await conn.execute(query)]
