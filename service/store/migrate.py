"""Applying and checking the database schema (Alembic)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

_SCRIPTS = Path(__file__).parent / "migrations"


class SchemaNotCurrent(RuntimeError):
    """The database's schema is not the one this code needs."""


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["url"] = url
    return config


def head_revision() -> str | None:
    """The newest migration this code ships."""
    return ScriptDirectory.from_config(_config("")).get_current_head()


def upgrade(url: str) -> None:
    """Create the database if it is missing (PostgreSQL), then migrate it to the head.

    Blocking: call it outside the event loop (it runs one of its own).
    """
    asyncio.run(ensure_database(url))
    command.upgrade(_config(url), "head")


async def ensure_database(url: str) -> None:
    """Create the PostgreSQL database ``url`` names if it does not exist yet."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql") or not parsed.database:
        return
    admin = create_async_engine(
        parsed.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with admin.connect() as conn:
            exists = await conn.scalar(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": parsed.database}
            )
            if not exists:
                quoted = parsed.database.replace('"', '""')
                await conn.execute(sa.text(f'CREATE DATABASE "{quoted}"'))
    finally:
        await admin.dispose()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def check_current(engine: AsyncEngine) -> None:
    """Raise SchemaNotCurrent unless the database is at this code's head revision."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current)
    head = head_revision()
    if current != head:
        raise SchemaNotCurrent(
            f"database schema is at revision {current or 'none'}, this server needs {head}: "
            "run `taskgate migrate` first"
        )
