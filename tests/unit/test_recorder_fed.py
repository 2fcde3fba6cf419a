"""With the state feed on, the recorder writes a task's pub/sub updates only until the feed
has read the task (``Recorder.fed``); updates from other sources are always written."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from service.domain.model import TaskState, TaskUpdate
from service.results.recorder import Recorder


class _Store:
    def __init__(self) -> None:
        self.batches: list[list[tuple[str, TaskState]]] = []

    async def apply_updates(self, batch: Sequence[TaskUpdate]) -> int:
        self.batches.append([(u.task_id, u.state) for u in batch])
        return len(batch)


async def test_fed_tasks_pubsub_updates_are_left_to_the_feed() -> None:
    store = _Store()
    recorder = Recorder(store)  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    recorder.record_published(TaskUpdate("a", TaskState.RUNNING, now))  # pub/sub first: pending
    recorder.record_published(TaskUpdate("b", TaskState.RUNNING, now))
    recorder.record(TaskUpdate("c", TaskState.RUNNING, now))  # a refresh: not pub/sub
    recorder.record_published(TaskUpdate("c", TaskState.SUCCEEDED, now))  # merged into it
    recorder.fed(["a", "c"])  # the feed read a and c: a's pending pub/sub update is dropped
    recorder.record_published(TaskUpdate("a", TaskState.SUCCEEDED, now))  # the feed writes it
    recorder.record(TaskUpdate("a", TaskState.SUCCEEDED, now))  # a refresh is still written
    await recorder.flush()
    written: list[Any] = [item for batch in store.batches for item in batch]
    assert sorted(written) == [
        ("a", TaskState.SUCCEEDED),
        ("b", TaskState.RUNNING),
        ("c", TaskState.SUCCEEDED),
    ]


async def test_without_the_feed_every_pubsub_update_is_written() -> None:
    store = _Store()
    recorder = Recorder(store)  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    for task_id in ("a", "b"):
        recorder.record_published(TaskUpdate(task_id, TaskState.SUCCEEDED, now))
    await recorder.flush()
    assert sorted(item for batch in store.batches for item in batch) == [
        ("a", TaskState.SUCCEEDED),
        ("b", TaskState.SUCCEEDED),
    ]


async def test_a_fed_tasks_running_state_read_from_redis_is_left_to_the_feed() -> None:
    # a status read's refresh (or a reconcile) reads Redis's latest state; by the time it is
    # written the feed may have written a newer one, which it would take back (progress 30
    # replaced by 29, then SUCCESS carries none: the final progress lost)
    store = _Store()
    recorder = Recorder(store)  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    recorder.fed(["a"])
    recorder.record(TaskUpdate("a", TaskState.RUNNING, now))  # left to the feed
    recorder.record(TaskUpdate("b", TaskState.RUNNING, now))  # not fed: written
    await recorder.flush()
    assert [item for batch in store.batches for item in batch] == [("b", TaskState.RUNNING)]


async def test_marked_documents_are_left_to_the_feed_on_every_replica() -> None:
    # every replica receives every pub/sub message, while each feed entry goes to one of
    # them: a document the worker marked (``in_feed``) is written by the feed alone, before
    # this process's feed has read anything of the task
    store = _Store()
    recorder = Recorder(store, feed=True)  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    recorder.record_published(TaskUpdate("a", TaskState.RUNNING, now, in_feed=True))
    recorder.record_published(TaskUpdate("a", TaskState.SUCCEEDED, now, in_feed=True))
    recorder.record(TaskUpdate("b", TaskState.RUNNING, now, in_feed=True))  # a refresh: may be stale
    recorder.record(TaskUpdate("c", TaskState.SUCCEEDED, now, in_feed=True))  # terminal: written
    recorder.record_published(TaskUpdate("d", TaskState.RUNNING, now))  # unmarked (no feed): written
    await recorder.flush()
    assert sorted(item for batch in store.batches for item in batch) == [
        ("c", TaskState.SUCCEEDED),
        ("d", TaskState.RUNNING),
    ]


async def test_marked_documents_are_written_when_this_gateway_reads_no_feed() -> None:
    store = _Store()
    recorder = Recorder(store, feed=False)  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    recorder.record(TaskUpdate("a", TaskState.RUNNING, now, in_feed=True))
    recorder.record_published(TaskUpdate("b", TaskState.RUNNING, now, in_feed=True))
    await recorder.flush()
    assert sorted(item for batch in store.batches for item in batch) == [
        ("a", TaskState.RUNNING),
        ("b", TaskState.RUNNING),
    ]
