"""What ``taskgate serve`` and ``taskgate migrate`` say when a dependency is missing: one line.

``preflight`` checks the database (reachable, exists, schema current) and Redis (broker and
result backend answer) before the server is even imported; ``problem_of`` turns the same
failures, raised later by the server or by a migration, into the same one-line messages.
Anything else is left alone (a bug: the traceback is wanted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from service.config import Settings
from service.domain.errors import BrokerUnavailable, DatabaseUnavailable
from service.store.migrate import SchemaNotCurrent, check_current
from service.store.tasks import PGBOUNCER_ARGS

#: Seconds a start-up check waits for a dependency to answer.
CHECK_TIMEOUT = 5.0


class StartupProblem(Exception):
    """A dependency is missing or unreachable; the message is one line for people."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words."""
    for cause in _chain(exc):
        if isinstance(cause, socket.gaierror):
            return "unknown host"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, TimeoutError | redis.exceptions.TimeoutError):
            return f"no answer within {CHECK_TIMEOUT:g} s"
    return _first_line(exc)


def database_endpoint(url: str) -> str:
    """``host:port`` of a database URL (the file for SQLite)."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        return parsed.database or ":memory:"
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}"


def redis_endpoint(url: str) -> str:
    """``host:port`` of a Redis URL."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def database_problem(exc: BaseException, url: str) -> str | None:
    """The one-line message for a database failure, or None if ``exc`` is not one."""
    where = database_endpoint(url)
    for cause in _chain(exc):
        if isinstance(cause, SchemaNotCurrent):
            return str(cause)
        name = type(cause).__name__
        if name == "InvalidCatalogNameError" or getattr(cause, "sqlstate", None) == "3D000":  # asyncpg
            return f'database "{make_url(url).database}" does not exist on {where}: run `taskgate migrate`'
        if name in ("InvalidPasswordError", "InvalidAuthorizationSpecificationError"):
            return f"the database on {where} refused the login: {_first_line(cause)} (DATABASE_URL)"
    if any(isinstance(cause, OSError | DatabaseUnavailable) for cause in _chain(exc)):
        return f"cannot connect to {where} (DATABASE_URL): {_reason(exc)}"
    if isinstance(exc, sa.exc.DBAPIError):
        return f"database on {where}: {_first_line(exc.orig or exc)} (DATABASE_URL)"
    return None


def problem_of(exc: BaseException, settings: Settings, *, serving: bool = True) -> str | None:
    """The one-line message for a failure of ``taskgate serve`` (or ``migrate``), or None (a bug).

    While serving, a bare OSError may be the listening socket rather than the database: it is
    shown as it is. For ``migrate`` (``serving=False``) every OSError is the database's.
    """
    if isinstance(exc, BrokerUnavailable):
        return f"cannot connect to {redis_endpoint(settings.broker_url)} (CELERY_BROKER_URL): {_reason(exc)}"
    if isinstance(exc, StartupProblem):
        return str(exc)
    if serving and isinstance(exc, OSError):
        return f"cannot start: {_first_line(exc)}"
    return database_problem(exc, settings.database_url)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only warnings from ``logger_name`` inside the block (Alembic logs every schema check)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


async def check_database(url: str, *, pgbouncer: bool = False) -> None:
    """Raise StartupProblem unless the database answers, exists and has the current schema
    (``pgbouncer``: no prepared statement outlives its transaction, as the store does)."""
    is_asyncpg = make_url(url).drivername.endswith("asyncpg")
    connect_args: dict[str, object] = {}
    if is_asyncpg:
        connect_args = {"timeout": CHECK_TIMEOUT, **(PGBOUNCER_ARGS if pgbouncer else {})}
    engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with _quiet("alembic"):
            await asyncio.wait_for(check_current(engine), CHECK_TIMEOUT * 2)
    except Exception as exc:
        message = database_problem(exc, url)
        if message is None:
            raise
        raise StartupProblem(message) from exc
    finally:
        await engine.dispose()


async def check_redis(url: str, variable: str) -> None:
    """Raise StartupProblem unless the Redis at ``url`` (named by env ``variable``) answers PING."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT)
    try:
        await client.ping()
    except redis.exceptions.AuthenticationError as exc:
        raise StartupProblem(
            f"Redis on {redis_endpoint(url)} refused the login: {_first_line(exc)} ({variable})"
        ) from exc
    except (redis.exceptions.RedisError, OSError) as exc:
        raise StartupProblem(f"cannot connect to {redis_endpoint(url)} ({variable}): {_reason(exc)}") from exc
    finally:
        await client.aclose()


def check_reachable(url: str) -> None:
    """Raise StartupProblem unless a TCP connection to the database server opens (not SQLite)."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        return
    try:
        with socket.create_connection((parsed.host or "localhost", parsed.port or 5432), CHECK_TIMEOUT):
            pass
    except OSError as exc:
        raise StartupProblem(
            f"cannot connect to {database_endpoint(url)} (DATABASE_URL): {_reason(exc)}"
        ) from exc


async def preflight(settings: Settings) -> None:
    """Check the database, the broker (if Redis) and the result backend before serving.

    Raises:
        StartupProblem: the first dependency that is missing or unreachable.
    """
    await check_database(settings.database_url, pgbouncer=settings.db_pgbouncer)
    if settings.broker_url.startswith(("redis://", "rediss://")):
        await check_redis(settings.broker_url, "CELERY_BROKER_URL")
    if settings.result_backend != settings.broker_url:
        await check_redis(settings.result_backend, "CELERY_RESULT_BACKEND")
