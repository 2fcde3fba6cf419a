"""The one place where driver errors become the store's errors.

::

    DatabaseUnavailable (domain)   no connection: refused, dropped, not allowed, too many,
                                   the database gone; wait and retry
    StatementRejected              the database refused this statement (bad data, a
                                   violated constraint); retrying it will not help

Any failure to obtain a connection is ``DatabaseUnavailable``, whatever the driver says;
a failure of a statement is ``DatabaseUnavailable`` when it is about the connection
(SQLSTATE class 08, 53300, 57P01-57P03, 3D000, or a connection the pool invalidated),
and ``StatementRejected`` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import asyncpg
import sqlalchemy as sa

from service.domain.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = "the task database is unreachable; retry later"

#: SQLSTATEs (or their class prefixes) that say the connection, not the statement, failed.
_UNAVAILABLE_SQLSTATES = ("08", "53300", "57P01", "57P02", "57P03", "3D000")

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # the connection's protocol state is broken ("another operation is in progress" after
    # the server terminated it mid-call): it must be discarded, like a dropped one
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


class StatementRejected(Exception):
    """The database refused a statement (bad data, a violated constraint): not an outage.

    The connection is fine and other statements still succeed: a caller writing a batch can
    write it one item at a time to find and drop the refused one.
    """


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the driver error SQLAlchemy wrapped, and their causes."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        orig = getattr(item, "orig", None)
        todo += [item.__cause__, orig if isinstance(orig, BaseException) else None]


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the connection failed rather than the statement."""
    chain = list(_chain(exc))
    if any(isinstance(item, asyncpg.exceptions.DataError) for item in chain):
        return False  # asyncpg could not encode an argument: the statement, not the link
    for item in chain:
        if isinstance(item, sa.exc.DBAPIError) and item.connection_invalidated:
            return True
        sqlstate = getattr(item, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
    return isinstance(exc, _CONNECTION_ERRORS)


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    """The ``DatabaseUnavailable`` to raise from ``exc`` (logged once, by type)."""
    log.warning("database unreachable: %s", type(exc).__name__)
    return DatabaseUnavailable(UNAVAILABLE_MESSAGE)


@contextlib.contextmanager
def connecting() -> Iterator[None]:
    """Any failure to obtain a connection inside the block is ``DatabaseUnavailable``."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        raise unavailable(exc) from exc


@contextlib.contextmanager
def statement_errors() -> Iterator[None]:
    """Driver errors inside the block become ``DatabaseUnavailable`` or ``StatementRejected``;
    anything else (a bug, a domain error) passes through."""
    try:
        yield
    except (DatabaseUnavailable, StatementRejected):
        raise
    except _DRIVER_ERRORS as exc:
        if is_unavailable(exc):
            raise unavailable(exc) from exc
        if isinstance(exc, sa.exc.DBAPIError | asyncpg.PostgresError | asyncpg.InterfaceError):
            raise StatementRejected(f"the database refused the statement: {type(exc).__name__}") from exc
        raise
