"""ListTasks' and CancelTask's store code on every database the store runs on.

The same ``TaskListing`` and ``CancelStore`` serve PostgreSQL and SQLite (``taskgate dev``):
filters, keyset pages in both orders, read isolation, and the cancel rules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from service.api.listing import parse_filter
from service.domain.model import TaskState, TaskUpdate
from service.domain.query import PageKey, TaskQuery
from service.store.cancel import CancelStore
from service.store.listing import TaskListing
from service.store.tasks import TaskStore
from tests.store.support import at, new_task

NOW = at(10_000)


async def _fill(store: TaskStore, count: int) -> list[str]:
    """``count`` tasks created one second apart; every third of bob's, every fifth SUCCEEDED."""
    ids = []
    for i in range(count):
        new = new_task(task_id=f"t-{i:03d}", caller="bob" if i % 3 == 0 else "alice")
        new = dataclasses.replace(new, create_time=at(i))
        await store.insert(new)
        if i % 5 == 0:
            done = TaskUpdate(new.task_id, TaskState.SUCCEEDED, at(i + 1), result=i)
            await store.apply_updates([done])
        ids.append(new.task_id)
    return ids


async def _all_pages(listing: TaskListing, query: TaskQuery) -> list[str]:
    seen: list[str] = []
    while True:
        page = await listing.page(query, NOW)
        seen += [record.task_id for record in page]
        if len(page) < query.limit:
            return seen
        last = page[-1]
        query = dataclasses.replace(query, after=PageKey(last.create_time, last.task_id))


async def test_pages_cover_every_task_once_in_both_orders(store: TaskStore) -> None:
    ids = await _fill(store, 23)
    listing = TaskListing(store.engine)
    newest = await _all_pages(listing, TaskQuery(limit=5))
    oldest = await _all_pages(listing, TaskQuery(limit=5, newest_first=False))
    assert newest == list(reversed(ids))
    assert oldest == ids


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("state = SUCCEEDED", lambda i: i % 5 == 0),
        ("state != TASK_STATE_SUCCEEDED", lambda i: i % 5 != 0),
        ('task_name = "demo.*"', lambda i: True),
        ('state = QUEUED OR state = SUCCEEDED AND task_name = "other"', lambda i: False),
        ('NOT state = SUCCEEDED AND create_time >= "2024-01-01T12:00:10Z"', lambda i: i >= 10 and i % 5),
        ('schedule_id = "nightly"', lambda i: False),
        ('workflow_id != "w"', lambda i: True),
    ],
)
async def test_filters_select_the_same_tasks_everywhere(
    store: TaskStore, text: str, expected: object
) -> None:
    ids = await _fill(store, 20)
    listing = TaskListing(store.engine)
    query = TaskQuery(filter=parse_filter(text), limit=1000, newest_first=False)
    chosen = [record.task_id for record in await listing.page(query, NOW)]
    assert chosen == [task_id for i, task_id in enumerate(ids) if expected(i)]  # type: ignore[operator]


async def test_a_caller_without_read_all_lists_only_its_own(store: TaskStore) -> None:
    ids = await _fill(store, 12)
    listing = TaskListing(store.engine)
    mine = await listing.page(TaskQuery(owner="bob", limit=100, newest_first=False), NOW)
    assert [record.task_id for record in mine] == [task_id for i, task_id in enumerate(ids) if i % 3 == 0]


async def test_cancel_rules(store: TaskStore) -> None:
    cancels = CancelStore(store.engine)
    held = new_task(task_id="held")
    published = new_task(task_id="published")
    running = new_task(task_id="running")
    done = new_task(task_id="done")
    for new in (held, published, running, done):
        await store.insert(new)
    await store.mark_published(["published", "running", "done"], at(1))
    await store.apply_updates(
        [
            TaskUpdate("running", TaskState.RUNNING, at(2), start_time=at(2)),
            TaskUpdate("done", TaskState.SUCCEEDED, at(3), result=3),
        ]
    )
    when = at(5)
    # never handed to the broker: CANCELLED at once, and off the outbox
    cancelled = await cancels.cancel("held", when, not_started=False)
    assert cancelled is not None and cancelled.state is TaskState.CANCELLED and cancelled.cancel_requested
    assert "held" not in [
        d.task_id for d in await store.claim_due(at(99), lease=dt.timedelta(seconds=30), limit=10)
    ]
    # in the broker, not started: CANCELLED at once only when the backend shows no start
    kept = await cancels.cancel("published", when, not_started=False)
    assert kept is not None and kept.state is TaskState.QUEUED and kept.cancel_requested
    gone = await cancels.cancel("published", when, not_started=True)
    assert gone is not None and gone.state is TaskState.CANCELLED
    # running: only the request is recorded
    asked = await cancels.cancel("running", when, not_started=False)
    assert asked is not None and asked.state is TaskState.RUNNING and asked.cancel_requested
    # finished: unchanged
    finished = await cancels.cancel("done", when, not_started=True)
    assert finished is not None and finished.state is TaskState.SUCCEEDED and not finished.cancel_requested
    assert await cancels.cancel("nope", when, not_started=True) is None
    assert (await store.get("running")) is not None
