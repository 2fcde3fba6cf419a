"""service.runtime.supervise: every loop outlives its failures, with bounded backoff."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.domain.errors import DatabaseUnavailable
from service.runtime.supervise import Backoff, Supervisor, supervise


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(first=0.5, cap=3.0)
    assert [backoff.after(n) for n in (1, 2, 3, 4, 10)] == [0.5, 1.0, 2.0, 3.0, 3.0]


async def test_a_step_that_fails_is_run_again_and_each_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds: list[int] = []
    done = asyncio.Event()

    async def step() -> float | None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise DatabaseUnavailable("database down")
        if len(rounds) == 2:
            raise RuntimeError("a bug")
        done.set()
        return None

    with caplog.at_level(logging.INFO, logger="service.runtime.supervise"):
        task = asyncio.create_task(supervise("probe", step, backoff=Backoff(first=0.001, cap=0.002)))
        await asyncio.wait_for(done.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == 1 and "probe paused" in warnings[0].getMessage()
    assert len(errors) == 1 and errors[0].exc_info is not None  # the traceback of the bug
    assert len(rounds) >= 3


async def test_cancelling_is_never_swallowed() -> None:
    started = asyncio.Event()

    async def step() -> float | None:
        started.set()
        await asyncio.sleep(3600)
        return None

    task = asyncio.create_task(supervise("sleeper", step))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_supervisor_owns_and_stops_every_loop() -> None:
    supervisor = Supervisor()
    ticks = {"a": 0, "b": 0}

    def counting(name: str) -> object:
        async def step() -> float:
            ticks[name] += 1
            return 0.001

        return step

    supervisor.start("a", counting("a"))  # type: ignore[arg-type]
    supervisor.start("b", counting("b"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="running already"):
        supervisor.start("a", counting("a"))  # type: ignore[arg-type]
    while min(ticks.values()) < 3:
        await asyncio.sleep(0.01)
    tasks = [supervisor.task("a"), supervisor.task("b")]
    assert supervisor.names == ["a", "b"]
    await supervisor.stop()
    assert all(task.done() for task in tasks)
    assert supervisor.names == []


async def test_until_ends_the_loop_after_a_round() -> None:
    stop = False
    rounds = 0

    async def step() -> float | None:
        nonlocal rounds, stop
        rounds += 1
        stop = rounds == 3
        return None

    await asyncio.wait_for(supervise("graceful", step, until=lambda: stop), 10)
    assert rounds == 3
