"""A database that refuses connections is unavailable (retry), never a refused statement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from service.domain.errors import DatabaseUnavailable
from service.domain.model import TaskState, TaskUpdate
from service.store.migrate import upgrade
from service.store.tasks import TaskStore
from tests.conftest import PG_ADMIN_URL, _admin, database_url
from tests.store.support import at, new_task


@pytest.fixture
def closed_db(run_id: str) -> Iterator[str]:
    """A migrated database of its own (the test closes and reopens it); dropped afterwards."""
    name = f"taskgate_store_closed_{run_id}"
    upgrade(database_url(name))
    yield name
    _admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def set_allow_connections(name: str, allow: bool) -> None:
    """Open or close database ``name``; closing it also ends every session on it."""
    engine = create_async_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'))
            if not allow:
                terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"
                await conn.execute(sa.text(terminate), {"name": name})
    finally:
        await engine.dispose()


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "portable"])
async def test_no_connections_allowed_is_unavailable(closed_db: str, fast_paths: bool) -> None:
    store = TaskStore.connect(database_url(closed_db), pool_size=2, fast_paths=fast_paths)
    new = new_task()
    try:
        await store.insert(new)  # the pool and the group commit hold live connections now
        await set_allow_connections(closed_db, False)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get(new.task_id),
            lambda: store.insert(new_task()),
            lambda: store.insert_batch([new_task()]),
            lambda: store.apply_updates([TaskUpdate(new.task_id, TaskState.RUNNING, at(1))]),
            lambda: store.claim_due(at(10), lease=at(1) - at(0), limit=10),
            lambda: store.mark_published([new.task_id], at(2)),
            lambda: store.retry_publish_at([new.task_id], at(2)),
            lambda: store.ping(),
            # the pooled connections are gone by now: these fail to connect (SQLSTATE 55000)
            lambda: store.get(new.task_id),
            lambda: store.active_ids(10),
        ]
        for call in calls:
            with pytest.raises(DatabaseUnavailable):
                await call()
        await set_allow_connections(closed_db, True)
        await store.ping()
        assert (await store.get(new.task_id)) == new.record
        assert await store.insert(new_task()) is None
    finally:
        await store.close()
