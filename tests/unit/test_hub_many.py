"""One inbox for many tasks (a workflow's stream): the hub's accounting, and the stream's
reads (a burst of updates costs one read; SHUTDOWN ends it)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from service.domain.errors import ShuttingDown
from service.domain.model import TaskRecord, TaskState, TaskUpdate
from service.results.hub import Inbox, ProgressHub, Signal
from service.usecases.workflow_watch import Wakeups, follow

SEEN = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def update(task_id: str, state: TaskState = TaskState.RUNNING) -> TaskUpdate:
    return TaskUpdate(task_id=task_id, state=state, observed_time=SEEN)


@pytest.fixture
async def hub() -> AsyncIterator[ProgressHub]:
    # never connected: registering and delivering are local
    hub = ProgressHub("redis://127.0.0.1:6379/15", "celery-task-meta-", lambda _: None)
    yield hub
    await hub.close()


def drain(inbox: Inbox) -> list[TaskUpdate | Signal]:
    return inbox.drain()


async def test_one_inbox_for_many_tasks_counts_once(hub: ProgressHub) -> None:
    single = hub.register("a")
    many = hub.register_many(["a", "b", "c", "b"])
    assert hub.watcher_count == 2
    for task_id in "abc":
        hub.deliver(update(task_id))
    assert [item.task_id for item in drain(many) if isinstance(item, TaskUpdate)] == ["a", "b", "c"]
    assert drain(single) == [update("a")]

    hub.unregister("b", many)  # still registered under a and c
    assert hub.watcher_count == 2
    hub.deliver(update("b"))
    assert drain(many) == []
    hub.unregister_many(["a", "b", "c"], many)
    assert hub.watcher_count == 1
    hub.unregister_many(["a", "c"], many)  # again: a no-op
    assert hub.watcher_count == 1
    hub.unregister("a", single)
    assert hub.watcher_count == 0
    assert hub._inboxes == {}


async def test_signals_reach_a_many_inbox_once(hub: ProgressHub) -> None:
    many = hub.register_many([str(n) for n in range(50)])
    single = hub.register("7")
    hub.begin_shutdown()
    assert drain(many) == [Signal.SHUTDOWN]
    assert drain(single) == [Signal.SHUTDOWN]
    late = hub.register_many(["x", "y"])  # registered while closing: told at once
    assert drain(late) == [Signal.SHUTDOWN]


async def test_a_many_inbox_holds_a_burst_of_one_update_per_task(hub: ProgressHub) -> None:
    ids = [str(n) for n in range(500)]
    many = hub.register_many(ids)
    for task_id in ids:
        hub.deliver(update(task_id))
    assert len(drain(many)) == 500


@dataclass
class View:
    state: TaskState
    tasks: list[TaskRecord] = field(default_factory=list)


async def test_a_burst_of_updates_costs_one_read(hub: ProgressHub) -> None:
    ids = [str(n) for n in range(500)]
    reads = 0
    state = TaskState.RUNNING

    async def read() -> View:
        nonlocal reads
        reads += 1
        return View(state)

    async def version() -> object:
        return reads

    stream = follow(hub, Wakeups(), "wf", ids, read, version, None)
    assert (await anext(stream)).state is TaskState.RUNNING
    assert hub.watcher_count == 1
    for task_id in ids:
        hub.deliver(update(task_id, TaskState.SUCCEEDED))
    state = TaskState.SUCCEEDED
    assert (await anext(stream)).state is TaskState.SUCCEEDED
    assert reads == 2
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert hub.watcher_count == 0


async def test_shutdown_ends_the_stream_and_wakeups_wake_it(hub: ProgressHub) -> None:
    reads = 0

    async def read() -> View:
        nonlocal reads
        reads += 1
        return View(TaskState.RUNNING)

    async def version() -> object:
        return 1

    wakeups = Wakeups()
    stream = follow(hub, wakeups, "wf", ["a"], read, version, None)
    await anext(stream)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    wakeups.wake("wf")  # a cancel in this process: one more read, no change to yield
    hub.begin_shutdown()
    with pytest.raises(ShuttingDown):
        await waiting
    assert hub.watcher_count == 0
    assert wakeups._inboxes == {}
