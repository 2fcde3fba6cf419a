"""service.runtime.supervise: a loop ends when it is cancelled even if its step lost the cancel.

Python 3.11's ``asyncio.wait_for`` returns its future's result when a cancel lands as that
future completes (the broker inspector awaits its ``query_task`` thread that way). A
supervised loop then went on after ``Supervisor.stop``: a stopped test gateway's recovery
pass kept running on the session's database and failed the next test's task
(tests/integration/test_recovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from service.runtime.supervise import Supervisor, supervise

#: Seconds a stop may take here (far above what it needs; a loop that goes on never ends).
WAIT = 10.0


async def _swallowing_step(entered: asyncio.Event, rounds: list[int]) -> float:
    """The first round loses a cancel, as 3.11's wait_for does, and returns normally; later
    rounds wait (and end on a cancel)."""
    rounds.append(len(rounds))
    entered.set()
    if len(rounds) > 1:
        await asyncio.sleep(3600)
    with contextlib.suppress(asyncio.CancelledError):  # the lost cancel this test stands for
        await asyncio.sleep(3600)
    return 0.0


async def _ended(task: asyncio.Task[None]) -> bool:
    """Whether ``task`` ends within WAIT seconds; cancelled again (and awaited) if not."""
    done, _ = await asyncio.wait([task], timeout=WAIT)
    if not done:
        task.cancel()
        await asyncio.wait([task])
    return bool(done)


async def test_a_cancel_the_step_lost_ends_the_loop_after_the_round() -> None:
    entered, rounds = asyncio.Event(), list[int]()
    task = asyncio.create_task(supervise("swallower", lambda: _swallowing_step(entered, rounds)))
    await entered.wait()
    task.cancel()
    assert await _ended(task)
    assert task.cancelled()
    assert rounds == [0]  # no round after the cancel


async def test_supervisor_stop_ends_a_loop_whose_step_lost_the_cancel() -> None:
    supervisor, entered, rounds = Supervisor(), asyncio.Event(), list[int]()
    supervisor.start("swallower", lambda: _swallowing_step(entered, rounds))
    task = supervisor.task("swallower")
    await entered.wait()
    await supervisor.stop(timeout=WAIT)
    assert await _ended(task)
    assert task.cancelled()
    assert rounds == [0]


async def test_a_loop_whose_task_took_its_cancel_back_goes_on() -> None:
    """``uncancel`` (as asyncio.timeout does for its own cancel) is not a request to stop."""
    rounds = 0
    done = asyncio.Event()

    async def step() -> float:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                task.uncancel()
        if rounds == 3:
            done.set()
        return 0.0

    loop = asyncio.create_task(supervise("timeouts", step))
    await asyncio.wait_for(done.wait(), WAIT)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert rounds >= 3
