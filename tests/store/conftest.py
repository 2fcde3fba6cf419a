"""The store under test, on each database it runs on.

``postgres`` is a fresh database of this run (migrated by ``migrate.upgrade``), with the
asyncpg fast paths; ``postgres-portable`` the same database through SQLAlchemy's portable
statements; ``sqlite`` a file database through aiosqlite, as ``taskgate dev`` runs it.
Every test starts on an empty ``tasks`` table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.store.base import TaskStorePort
from service.store.migrate import upgrade
from service.store.tasks import TaskStore, tasks
from tests.conftest import _admin, database_url

BACKENDS = ["postgres", "sqlite"]


@pytest.fixture(scope="session")
def pg_store_url(run_id: str) -> Iterator[str]:
    """A migrated PostgreSQL database of the store tests, dropped afterwards."""
    name = f"taskgate_store_{run_id}"
    url = database_url(name)
    upgrade(url)
    yield url
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file database."""
    path: Path = tmp_path_factory.mktemp("store") / "taskgate.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url)
    return url


def open_store(backend: str, pg_url: str, sqlite_url: str) -> TaskStore:
    """A store of ``backend`` (see the module's docstring)."""
    if backend == "sqlite":
        return TaskStore.connect(sqlite_url)
    return TaskStore.connect(pg_url, pool_size=2, fast_paths=backend == "postgres")


@pytest.fixture(params=BACKENDS)
async def store(
    request: pytest.FixtureRequest, pg_store_url: str, sqlite_url: str
) -> AsyncIterator[TaskStore]:
    """The store on each database, on an empty table."""
    store = open_store(request.param, pg_store_url, sqlite_url)
    port: TaskStorePort = store  # TaskStore implements the port
    async with store.engine.begin() as conn:
        await conn.execute(sa.delete(tasks))
    yield store
    await port.close()
