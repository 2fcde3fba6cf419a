"""One transition rule: every store path writes what ``domain.model.advance`` computes.

The same sequences of updates go through the domain and through each store path (the
PostgreSQL batch ``UPDATE … FROM unnest``, the portable per-task UPDATEs on PostgreSQL and
on SQLite; whole batches and one update per call); the rows must equal the domain's records,
and each call must report the rows the domain changes. The sequences race as the gateway's
sources do: a STARTED (with the worker's start) or a PROGRESS may come after the terminal
state, and must fill in what the rule's ``late`` takes allow and nothing else.
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
STEPS = 6


def random_progress(rng: random.Random, step: int) -> Progress:
    """A progress report: equal ``current`` values are common, halves and new totals too."""
    current = rng.randrange(5) + rng.choice([0.0, 0.0, 0.5])
    return Progress(current, rng.choice([4.0, 4.0, 5.0]), f"s{step}", {"k": step})


def late_update(rng: random.Random, task_id: str, step: int) -> TaskUpdate:
    """A STARTED or PROGRESS recorded out of order (often after the terminal state): the
    worker's start (before, at or after the end) and/or progress, no end, result or error."""
    progress = random_progress(rng, step) if rng.random() < 0.6 else None
    start = at(rng.randrange(0, 60)) if progress is None or rng.random() < 0.6 else None
    return TaskUpdate(
        task_id=task_id,
        state=TaskState.RUNNING,
        observed_time=at(10 * step + rng.randrange(0, 30)),
        progress=progress,
        retries=rng.choice([None, 0, 1]),
        start_time=start,
        worker=rng.choice([None, "celery@late"]),
    )


def random_update(rng: random.Random, task_id: str, step: int) -> TaskUpdate:
    """One update, with each optional field present or not, times in any order."""
    if step and rng.random() < 0.35:
        return late_update(rng, task_id, step)
    state = rng.choice(list(TaskState))

    def maybe_time() -> object:
        return at(rng.randrange(0, 100)) if rng.random() < 0.5 else None

    return TaskUpdate(
        task_id=task_id,
        state=state,
        observed_time=at(10 * step + rng.randrange(0, 30)),
        progress=random_progress(rng, step) if rng.random() < 0.5 else None,
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


def changes(record: TaskRecord, update: TaskUpdate) -> bool:
    """Whether the store writes the row: always while unfinished, once terminal only when
    the update fills something in."""
    return not record.state.terminal or advance(record, update) != record


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "single"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_store_writes_what_the_domain_computes(any_store: TaskStore, batched: bool, seed: int) -> None:
    rng = random.Random(seed)
    news = [new_task() for _ in range(TASKS)]
    await any_store.insert_batch(news)
    plans = {new.task_id: [random_update(rng, new.task_id, step) for step in range(STEPS)] for new in news}
    records = {new.task_id: new.record for new in news}
    for step in range(STEPS):
        updates = [plan[step] for plan in plans.values()]
        written = sum(changes(records[update.task_id], update) for update in updates)
        if batched:
            changed = await any_store.apply_updates(updates)
        else:
            changed = sum([await any_store.apply_updates([update]) for update in updates])
        assert changed == written, step
        records = {update.task_id: advance(records[update.task_id], update) for update in updates}
    for new in news:
        want = expected(new.record, plans[new.task_id])
        assert await any_store.get(new.task_id) == want, plans[new.task_id]


def test_the_sequences_fill_terminal_records_in() -> None:
    """The random sequences do reach the late fill-ins: an earlier start and a further
    progress taken by a terminal record (else the comparison above proves little)."""
    rng = random.Random(1)
    starts = progresses = 0
    for task in range(TASKS * 3):
        record = new_task().record
        for step in range(STEPS):
            update = random_update(rng, str(task), step)
            after = advance(record, update)
            if record.state.terminal and after != record:
                starts += after.start_time != record.start_time
                progresses += after.progress != record.progress
                assert (after.state, after.result, after.error) == (record.state, record.result, record.error)
                assert (after.end_time, after.retries, after.update_time) == (
                    record.end_time,
                    record.retries,
                    record.update_time,
                )
            record = after
    assert starts and progresses


def _fed(update: TaskUpdate, position: int) -> TaskUpdate:
    return dataclasses.replace(update, feed_position=position)


async def test_a_feed_entry_older_than_one_taken_does_not_take_the_task_back(any_store: TaskStore) -> None:
    # replicas write one task's feed entries out of order: its first progress (entry 300)
    # before its STARTED (entry 100), a later progress (500) before an earlier one (400)
    new = new_task()
    await any_store.insert_batch([new])
    task_id = new.task_id
    started = TaskUpdate(task_id, TaskState.RUNNING, at(5), start_time=at(1), worker="celery@w")
    progress = [
        TaskUpdate(task_id, TaskState.RUNNING, at(6), progress=Progress(current, 4), start_time=at(6))
        for current in (1.0, 3.0, 2.0)
    ]
    await any_store.apply_updates([_fed(progress[0], 300)])
    await any_store.apply_updates([_fed(started, 100)])  # older: the start and worker only
    record = await any_store.get(task_id)
    assert record is not None and record.progress is not None
    assert (record.state, record.progress.current, record.start_time) == (TaskState.RUNNING, 1.0, at(1))
    assert (await _worker(any_store, task_id)) == "celery@w"
    await any_store.apply_updates([_fed(progress[1], 500)])
    await any_store.apply_updates([_fed(progress[2], 400)])  # older, and not further: ignored
    record = await any_store.get(task_id)
    assert record is not None and record.progress is not None and record.progress.current == 3.0
    retry = TaskUpdate(task_id, TaskState.RETRYING, at(7), error=TaskError("E", "m", ""), retries=0)
    await any_store.apply_updates([_fed(retry, 450)])  # older than 500: the task runs on
    record = await any_store.get(task_id)
    assert record is not None and (record.state, record.error) == (TaskState.RUNNING, None)
    done = TaskUpdate(task_id, TaskState.SUCCEEDED, at(9), result=7, end_time=at(9))
    await any_store.apply_updates([_fed(done, 200)])  # terminal: taken whatever its position
    record = await any_store.get(task_id)
    assert record is not None and (record.state, record.result) == (TaskState.SUCCEEDED, 7)
    assert record.progress is not None and record.progress.current == 3.0


async def test_updates_without_a_feed_position_are_taken_in_any_order(any_store: TaskStore) -> None:
    # pub/sub and Redis reads carry no position: the rule alone, as before the feed
    new = new_task()
    await any_store.insert_batch([new])
    task_id = new.task_id
    await any_store.apply_updates(
        [_fed(TaskUpdate(task_id, TaskState.RUNNING, at(5), progress=Progress(3, 4)), 900)]
    )
    await any_store.apply_updates([TaskUpdate(task_id, TaskState.RUNNING, at(6), progress=Progress(1, 4))])
    record = await any_store.get(task_id)
    assert record is not None and record.progress is not None and record.progress.current == 1.0


async def _worker(store: TaskStore, task_id: str) -> str | None:
    async with store.engine.connect() as conn:
        worker: str | None = await conn.scalar(sa.select(tasks.c.worker).where(tasks.c.task_id == task_id))
    return worker
