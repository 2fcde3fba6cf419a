"""A stream's inbox: order, bound, time-outs and waits without a time limit."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from service.domain.model import TaskState, TaskUpdate
from service.results.hub import Inbox, Signal

SEEN = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def update(n: int) -> TaskUpdate:
    return TaskUpdate(task_id=str(n), state=TaskState.RUNNING, observed_time=SEEN)


async def test_items_come_out_in_order() -> None:
    inbox = Inbox()
    inbox.put(update(1))
    inbox.put(Signal.RESYNC)
    assert await inbox.get(1.0) == update(1)
    assert await inbox.get(1.0) is Signal.RESYNC


async def test_a_full_inbox_drops_the_oldest() -> None:
    inbox = Inbox(size=2)
    for n in range(3):
        inbox.put(update(n))
    assert [(await inbox.get(1.0)) for _ in range(2)] == [update(1), update(2)]


async def test_a_full_inbox_keeps_its_signals() -> None:
    # an EXPIRED or SHUTDOWN behind a burst of updates must still end the stream
    inbox = Inbox(size=3)
    inbox.put(Signal.EXPIRED)
    for n in range(4):
        inbox.put(update(n))
    assert [(await inbox.get(1.0)) for _ in range(3)] == [Signal.EXPIRED, update(2), update(3)]


async def test_an_inbox_full_of_signals_drops_the_oldest() -> None:
    inbox = Inbox(size=2)
    for signal in (Signal.PAUSED, Signal.RESYNC, Signal.SHUTDOWN):
        inbox.put(signal)
    assert [(await inbox.get(1.0)) for _ in range(2)] == [Signal.RESYNC, Signal.SHUTDOWN]


async def test_get_times_out_with_none() -> None:
    assert await Inbox().get(0.01) is None


async def test_a_put_wakes_a_waiting_get_without_a_time_limit() -> None:
    inbox = Inbox()
    waiting = asyncio.create_task(inbox.get(None))
    await asyncio.sleep(0)
    assert not waiting.done()
    inbox.put(Signal.SHUTDOWN)
    assert await waiting is Signal.SHUTDOWN


async def test_a_cancelled_get_leaves_the_inbox_usable() -> None:
    inbox = Inbox()
    waiting = asyncio.create_task(inbox.get(None))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    inbox.put(update(7))
    assert await inbox.get(0.01) == update(7)
