"""One transition rule: every store path writes what ``domain.model.advance`` computes.

The same sequences of updates go through the domain and through each store path (the
PostgreSQL batch ``UPDATE … FROM unnest``, the portable per-task UPDATE on PostgreSQL and
on SQLite; whole batches and one update per call); the rows must equal the domain's records.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from service.domain.model import Progress, TaskError, TaskRecord, TaskState, TaskUpdate, advance
from service.store.rows import without_nul
from service.store.tasks import TaskStore, tasks
from tests.store.conftest import open_store
from tests.store.support import at, new_task

TASKS = 40
STEPS = 4


def random_update(rng: random.Random, task_id: str, step: int) -> TaskUpdate:
    """One update, with each optional field present or not, times in any order."""
    state = rng.choice(list(TaskState))

    def maybe_time() -> object:
        return at(rng.randrange(0, 100)) if rng.random() < 0.5 else None

    return TaskUpdate(
        task_id=task_id,
        state=state,
        observed_time=at(10 * step + rng.randrange(0, 30)),
        progress=Progress(rng.randrange(5), 4.0, f"s{step}", {"k": step}) if rng.random() < 0.5 else None,
        result=rng.choice([None, 0, "ok", {"x": [1, 2]}, "a\x00b"]),
        error=TaskError("ValueError", f"boom {step}", "tb") if rng.random() < 0.3 else None,
        retries=rng.randrange(3) if rng.random() < 0.5 else None,
        start_time=maybe_time(),  # type: ignore[arg-type]
        end_time=maybe_time(),  # type: ignore[arg-type]
    )


def expected(record: TaskRecord, updates: list[TaskUpdate]) -> TaskRecord:
    """The domain's record after ``updates``, its JSON as stored (U+0000 as U+FFFD)."""
    for update in updates:
        record = advance(record, update)
    return dataclasses.replace(record, result=without_nul(record.result))


@pytest.fixture(params=["postgres", "postgres-portable", "sqlite"])
async def any_store(
    request: pytest.FixtureRequest, pg_store_url: str, sqlite_url: str
) -> AsyncIterator[TaskStore]:
    store = open_store(request.param, pg_store_url, sqlite_url)
    async with store.engine.begin() as conn:
        await conn.execute(sa.delete(tasks))
    yield store
    await store.close()


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "single"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_store_writes_what_the_domain_computes(any_store: TaskStore, batched: bool, seed: int) -> None:
    rng = random.Random(seed)
    news = [new_task() for _ in range(TASKS)]
    await any_store.insert_batch(news)
    plans = {new.task_id: [random_update(rng, new.task_id, step) for step in range(STEPS)] for new in news}
    for step in range(STEPS):
        updates = [plan[step] for plan in plans.values()]
        if batched:
            await any_store.apply_updates(updates)
        else:
            for update in updates:
                await any_store.apply_updates([update])
    for new in news:
        want = expected(new.record, plans[new.task_id])
        assert await any_store.get(new.task_id) == want, plans[new.task_id]
