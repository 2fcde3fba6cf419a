"""The recovery pass's conditional writes (service.store.recovery.RecoveryStore), on every
database the store runs on."""

from __future__ import annotations

import sqlalchemy as sa

from service.domain.model import TaskState
from service.store.recovery import RecoveryStore
from service.store.tables import workers
from service.store.tasks import TaskStore, tasks
from tests.store.support import T0, at, new_task

NODE = "celery@live"


async def running(store: TaskStore, *task_ids: str, worker: str = NODE) -> None:
    """Insert ``task_ids`` as RUNNING on ``worker``, last updated at ``T0``."""
    for task_id in task_ids:
        await store.insert(new_task(task_id=task_id))
    async with store.engine.begin() as conn:
        await conn.execute(
            tasks.update()
            .where(tasks.c.task_id.in_(task_ids))
            .values(state=TaskState.RUNNING.value, worker=worker, update_time=T0, publish_after=None)
        )


async def test_requeue_returns_only_the_ids_it_changed(store: TaskStore) -> None:
    await running(store, "a", "b")
    await running(store, "elsewhere", worker="celery@other")
    recovery = RecoveryStore(store.engine)
    assert await recovery.requeue(["b", "a", "elsewhere", "unknown"], NODE, at(60)) == ["a", "b"]
    # a second replica making the same decision changes nothing, so it forgets nothing
    assert await recovery.requeue(["a", "b"], NODE, at(61)) == []
    async with store.engine.connect() as conn:
        states = dict((await conn.execute(sa.select(tasks.c.task_id, tasks.c.state))).all())
    assert states == {"a": "QUEUED", "b": "QUEUED", "elsewhere": "RUNNING"}


async def test_requeue_keeps_a_row_updated_since_the_bound(store: TaskStore) -> None:
    await running(store, "quiet", "busy")
    async with store.engine.begin() as conn:
        await conn.execute(tasks.update().where(tasks.c.task_id == "busy").values(update_time=at(30)))
    recovery = RecoveryStore(store.engine)
    assert await recovery.requeue(["quiet", "busy"], NODE, at(60), updated_before=at(10)) == ["quiet"]


async def test_known_workers_are_those_whose_heartbeat_was_seen(store: TaskStore) -> None:
    recovery = RecoveryStore(store.engine)
    async with store.engine.begin() as conn:
        await conn.execute(sa.delete(workers))
    assert await recovery.known_workers() == set()
    await recovery.saw_heartbeats({NODE, "celery@b"}, T0)
    await recovery.saw_heartbeats({NODE}, at(5))
    assert await recovery.known_workers() == {NODE, "celery@b"}
