"""The store contract (``service.store.base.TaskStorePort``), on every database it runs on.

New store features are written against these tests first.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import sqlalchemy as sa

from service.domain.errors import RequestIdConflict
from service.domain.model import Progress, TaskError, TaskState, TaskUpdate
from service.store.base import ActiveKey
from service.store.errors import StatementRejected
from service.store.postgres import COPY_FROM
from service.store.tasks import TaskStore, tasks
from tests.store.support import T0, at, new_task

LEASE = dt.timedelta(seconds=30)


async def column(store: TaskStore, name: str, task_id: str) -> object:
    async with store.engine.connect() as conn:
        return await conn.scalar(sa.select(tasks.c[name]).where(tasks.c.task_id == task_id))


async def test_insert_then_get(store: TaskStore) -> None:
    new = new_task()
    assert await store.insert(new) is None
    assert await store.get(new.task_id) == new.record
    assert await store.get("no-such-task") is None


async def test_insert_with_request_id_repeats_and_conflicts(store: TaskStore) -> None:
    first = new_task(request_id="r1")
    assert await store.insert(first) is None
    again = dataclasses.replace(first, delivery=dataclasses.replace(first.delivery, task_id="other"))
    assert await store.insert(again) == first.record
    assert await store.get("other") is None
    with pytest.raises(RequestIdConflict):
        await store.insert(dataclasses.replace(again, fingerprint="different"))
    # another caller's request_id is its own
    assert await store.insert(dataclasses.replace(again, caller="bob")) is None


@pytest.mark.parametrize("size", [3, COPY_FROM])
async def test_insert_batch_all_rows(store: TaskStore, size: int) -> None:
    news = [new_task() for _ in range(size)]
    assert await store.insert_batch(news) is None
    for new in news:
        assert await store.get(new.task_id) == new.record


async def test_insert_batch_is_all_or_nothing(store: TaskStore) -> None:
    taken = new_task()
    await store.insert(taken)
    fresh = new_task()
    with pytest.raises(StatementRejected):
        await store.insert_batch([fresh, dataclasses.replace(taken)])
    assert await store.get(fresh.task_id) is None


async def test_insert_batch_dedupes_by_request_id(store: TaskStore) -> None:
    news = [new_task(request_id=f"b1-{i}") for i in range(3)]
    assert await store.insert_batch(news, request_id="b1") is None
    repeat = [
        dataclasses.replace(n, delivery=dataclasses.replace(n.delivery, task_id=f"x{i}"))
        for i, n in enumerate(news)
    ]
    assert await store.insert_batch(repeat, request_id="b1") == [new.record for new in news]
    assert await store.get("x0") is None


async def test_insert_batch_conflicts(store: TaskStore) -> None:
    news = [new_task(request_id=f"b2-{i}") for i in range(2)]
    await store.insert_batch(news, request_id="b2")
    changed = [news[0], dataclasses.replace(news[1], fingerprint="other")]
    with pytest.raises(RequestIdConflict):
        await store.insert_batch(changed, request_id="b2")
    partly = [news[0], new_task(request_id="b2-new")]
    with pytest.raises(RequestIdConflict):
        await store.insert_batch(partly, request_id="b2")
    assert await store.get(partly[1].task_id) is None


async def test_apply_updates_follows_the_transition_rule(store: TaskStore) -> None:
    new = new_task()
    await store.insert(new)
    running = TaskUpdate(
        new.task_id, TaskState.RUNNING, at(10), progress=Progress(1, 4, "a"), start_time=at(10)
    )
    assert await store.apply_updates([running]) == 1
    retrying = TaskUpdate(new.task_id, TaskState.RETRYING, at(20), retries=1, start_time=at(20))
    assert await store.apply_updates([retrying]) == 1
    record = await store.get(new.task_id)
    assert record is not None
    assert (record.state, record.progress, record.retries) == (TaskState.RETRYING, Progress(1, 4, "a"), 1)
    assert record.start_time == at(10)  # set once
    # the worker's clock says it ended before the gateway saw it start: never inverted
    done = TaskUpdate(new.task_id, TaskState.SUCCEEDED, at(30), result={"x": [1]}, end_time=at(5))
    assert await store.apply_updates([done]) == 1
    record = await store.get(new.task_id)
    assert record is not None
    assert (record.state, record.result, record.end_time, record.start_time) == (
        TaskState.SUCCEEDED, {"x": [1]}, at(5), at(5),
    )  # fmt: skip
    # terminal is never overwritten
    late = TaskUpdate(new.task_id, TaskState.FAILED, at(40), error=TaskError("E", "late"))
    assert await store.apply_updates([late]) == 0
    assert await store.get(new.task_id) == record
    assert await store.apply_updates([]) == 0


async def test_apply_updates_clears_the_outbox_mark(store: TaskStore) -> None:
    new = new_task(publish_after=at(100))
    await store.insert(new)
    await store.apply_updates([TaskUpdate(new.task_id, TaskState.RUNNING, at(10))])
    assert await store.claim_due(at(200), lease=LEASE, limit=10) == []
    assert await column(store, "publish_time", new.task_id) == at(10)


async def test_claim_due_leases(store: TaskStore) -> None:
    due, later = new_task(publish_after=at(1)), new_task(publish_after=at(60))
    await store.insert_batch([due, later])
    claimed = await store.claim_due(at(10), lease=LEASE, limit=10)
    assert claimed == [due.delivery]
    assert await store.claim_due(at(20), lease=LEASE, limit=10) == []  # leased
    again = await store.claim_due(at(10) + LEASE, lease=LEASE, limit=10)
    assert [d.task_id for d in again] == [due.task_id]  # the lease ran out
    assert await column(store, "publish_attempts", due.task_id) == 2


async def test_claim_due_limit_oldest_first(store: TaskStore) -> None:
    news = [new_task(publish_after=at(i)) for i in (3, 1, 2)]
    await store.insert_batch(news)
    claimed = await store.claim_due(at(10), lease=LEASE, limit=2)
    assert [d.task_id for d in claimed] == [news[1].task_id, news[2].task_id]


async def test_claim_due_skips_locked_rows(store: TaskStore) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: there are no row locks to skip")
    locked, free = new_task(publish_after=at(1)), new_task(publish_after=at(2))
    await store.insert_batch([locked, free])
    async with store.engine.connect() as other, other.begin():
        await other.execute(
            sa.select(tasks.c.task_id).where(tasks.c.task_id == locked.task_id).with_for_update()
        )
        claimed = await store.claim_due(at(10), lease=LEASE, limit=10)
    assert [d.task_id for d in claimed] == [free.task_id]


async def test_mark_published(store: TaskStore) -> None:
    new = new_task()
    await store.insert(new)
    assert await store.active_ids(10) == []  # not published yet
    await store.mark_published([new.task_id], at(5))
    await store.mark_published([new.task_id], at(9))  # the first time stays
    await store.mark_published([], at(9))
    assert await column(store, "publish_time", new.task_id) == at(5)
    assert await store.claim_due(at(100), lease=LEASE, limit=10) == []
    assert await store.active_ids(10) == [new.task_id]


async def test_retry_publish_at(store: TaskStore) -> None:
    failed, published = new_task(), new_task()
    await store.insert_batch([failed, published])
    await store.claim_due(at(1), lease=LEASE, limit=10)
    await store.mark_published([published.task_id], at(2))
    await store.retry_publish_at([failed.task_id, published.task_id], at(3))
    await store.retry_publish_at([], at(3))
    claimed = await store.claim_due(at(3), lease=LEASE, limit=10)
    assert [d.task_id for d in claimed] == [failed.task_id]  # a published task stays published


async def test_active_ids(store: TaskStore) -> None:
    news = [new_task() for _ in range(4)]
    await store.insert_batch(news)
    await store.mark_published([n.task_id for n in news[:3]], T0)
    await store.apply_updates([
        TaskUpdate(news[0].task_id, TaskState.RUNNING, at(20)),
        TaskUpdate(news[1].task_id, TaskState.RUNNING, at(10)),
        TaskUpdate(news[2].task_id, TaskState.SUCCEEDED, at(5)),
    ])  # fmt: skip
    assert await store.active_ids(10) == [news[1].task_id, news[0].task_id]
    assert await store.active_ids(1) == [news[1].task_id]


async def test_active_page_walks_every_unfinished_task(store: TaskStore) -> None:
    news = [new_task(task_id=f"t{i}") for i in range(7)]
    await store.insert_batch(news)
    await store.mark_published([n.task_id for n in news[:6]], T0)  # t6: not published
    await store.apply_updates([
        TaskUpdate("t0", TaskState.RUNNING, at(20)),
        TaskUpdate("t1", TaskState.RUNNING, at(10)),
        TaskUpdate("t2", TaskState.SUCCEEDED, at(5)),
        TaskUpdate("t3", TaskState.RUNNING, at(10)),  # the same time as t1: task_id breaks the tie
        TaskUpdate("t4", TaskState.RUNNING, at(10)),
        TaskUpdate("t5", TaskState.RUNNING, at(99)),  # after the walk's bound
    ])  # fmt: skip
    walked: list[ActiveKey] = []
    after: ActiveKey | None = None
    while page := await store.active_page(after, 2, updated_before=at(30)):
        assert len(page) <= 2
        walked += page
        after = page[-1]
    assert walked == [
        ActiveKey(at(10), "t1"),
        ActiveKey(at(10), "t3"),
        ActiveKey(at(10), "t4"),
        ActiveKey(at(20), "t0"),
    ]
    assert await store.active_page(None, 10, updated_before=at(99)) == [*walked, ActiveKey(at(99), "t5")]
    assert await store.active_page(walked[-1], 10, updated_before=at(30)) == []


async def test_a_refused_statement_is_isolated(store: TaskStore) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite stores any integer the driver passes")
    new = new_task()
    await store.insert(new)
    with pytest.raises(StatementRejected):
        await store.apply_updates([TaskUpdate(new.task_id, TaskState.RETRYING, at(1), retries=2**40)])
    assert await store.apply_updates([TaskUpdate(new.task_id, TaskState.RETRYING, at(1), retries=2)]) == 1
