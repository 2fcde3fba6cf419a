"""The measured PostgreSQL hot paths: statements sent straight to asyncpg.

SQLAlchemy's statement layer costs more Python per call than these statements cost the
database, so the hot paths (insert, get, apply_updates, mark_published) bypass it on
PostgreSQL: one ``unnest`` statement with one array per column (asyncpg encodes them in C),
binary COPY for large batches, self-committing single statements.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.store.errors import is_unavailable, unavailable
from service.store.rows import INSERT_COLUMNS, INSERT_NAMES, NewTask, insert_values
from service.store.tables import tasks

SELECT_ONE = f"SELECT {', '.join(tasks.c.keys())} FROM tasks WHERE task_id = $1"

MARK_PUBLISHED = """
UPDATE tasks SET publish_after = NULL, publish_time = coalesce(publish_time, $2)
WHERE task_id IN (SELECT task_id FROM tasks WHERE task_id = ANY($1::varchar[]) ORDER BY task_id FOR UPDATE)
"""

#: From this many rows on, binary COPY beats one INSERT … unnest: about half the cost per row
#: (measured: 2.6 against 5.5 ms for 500 rows), for one more round trip.
COPY_FROM = 64
UNNEST_INSERT = "INSERT INTO tasks ({names}) SELECT {casts} FROM unnest({arrays}) AS t({names})".format(
    names=", ".join(name for name, _ in INSERT_COLUMNS),
    # JSON travels as text and is cast per row; the other types go as typed arrays
    casts=", ".join(f"t.{name}::jsonb" if kind == "jsonb" else f"t.{name}" for name, kind in INSERT_COLUMNS),
    arrays=", ".join(
        f"${i}::{'text' if kind == 'jsonb' else kind}[]" for i, (_, kind) in enumerate(INSERT_COLUMNS, 1)
    ),
)


def columns(rows: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows of ``width`` values as ``width`` column lists (the arrays of an ``unnest``)."""
    result: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for values, value in zip(result, row, strict=True):
            values.append(value)
    return result


async def insert_rows(conn: AsyncConnection, news: Sequence[NewTask]) -> None:
    """INSERT rows on ``conn`` (in its transaction, if it has one): one ``unnest``
    statement, or binary COPY from ``COPY_FROM`` rows on. Either way all rows or none."""
    if len(news) >= COPY_FROM:
        records = [insert_values(new) for new in news]
        await on_driver(
            conn,
            "COPY tasks",
            lambda driver: driver.copy_records_to_table("tasks", records=records, columns=INSERT_NAMES),
        )
        return
    arrays = columns((insert_values(new) for new in news), len(INSERT_COLUMNS))
    await driver_execute(conn, UNNEST_INSERT, *arrays)


async def driver_execute(conn: AsyncConnection, statement: str, *args: Any) -> str:
    """Run ``statement`` on the asyncpg connection under ``conn`` (see ``on_driver``)."""
    status: str = await on_driver(conn, statement, lambda driver: driver.execute(statement, *args))
    return status


async def driver_fetchrow(conn: AsyncConnection, statement: str, *args: Any) -> Mapping[Any, Any] | None:
    """The first row of ``statement`` on the asyncpg connection under ``conn``, or None."""
    row: Mapping[Any, Any] | None = await on_driver(
        conn, statement, lambda driver: driver.fetchrow(statement, *args)
    )
    return row


async def on_driver(conn: AsyncConnection, what: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """``call`` the asyncpg connection under ``conn``, bypassing SQLAlchemy's statement layer.

    Raises:
        sa.exc.IntegrityError: a unique constraint was violated (as SQLAlchemy raises it,
            for the request_id race of ``TaskStore``).
        DatabaseUnavailable: the connection failed (it is discarded from the pool).
        asyncpg.PostgresError: the statement was refused (the store maps it).
    """
    raw = await conn.get_raw_connection()
    try:
        return await call(raw.driver_connection)
    except asyncpg.UniqueViolationError as exc:
        raise sa.exc.IntegrityError(what, None, exc) from exc
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        await conn.invalidate()
        raise unavailable(exc) from exc
