"""A dead worker's prefetched messages come back within the recovery bound, not the
visibility timeout (service.usecases.recovery ``orphaned``), on the real stack.

A private worker with one thread and a prefetch of nine takes one long ``demo.sleep`` and
eight ``demo.record`` behind it: the eight sit in kombu's unacked hash, not started. The
gateway runtime runs a recovery pass every second and looks at messages taken more than
2 s ago; the broker's visibility timeout stays at its default (an hour), so anything that
comes back within these tests came back through the recovery pass.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from service.app import Runtime
from service.broker.inspect import BrokerInspector
from service.config import Settings
from service.domain.model import TaskState
from tests.conftest import child_env
from tests.helpers import worker_group
from tests.integration.test_recovery import enqueue, fast, gateway, kill_group, wait_for, watched

#: Seconds any one wait may take (far above what the tests need).
WAIT = 90.0
#: Records prefetched behind the long task.
PREFETCHED = 8


@contextmanager
def worker(settings: Settings, log_path: Path, node: str, queue: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker on ``queue`` with one thread and a prefetch of nine, in its own process group."""
    env = child_env(settings, TASKGATE_WORKER_HEARTBEAT="1")
    options = ("-c", "1", "--prefetch-multiplier", str(PREFETCHED + 1), "-n", node, "-Q", queue)
    with worker_group(env, log_path, *options) as process:
        yield process


def unacked_ids(client: redis.Redis, settings: Settings) -> str:
    """Every message the unacked hash holds, as one string to search task ids in."""
    values: list[bytes] = client.hvals(f"{settings.key_prefix}unacked")  # type: ignore[assignment]
    return b"".join(values).decode(errors="replace")


async def prefetch(
    runtime: Runtime, client: redis.Redis, queue: str, node: str, sleep: float
) -> tuple[str, list[str], str]:
    """Enqueue one ``demo.sleep`` (RUNNING on ``node``) and eight records behind it; returns
    the sleep's id, the records' ids and their tag once all eight sit in the unacked hash."""
    settings = runtime.settings
    blocker = await enqueue(runtime, "demo.sleep", [sleep], queue)
    await wait_for(runtime, blocker, TaskState.RUNNING)
    tag = uuid.uuid4().hex
    records = [await enqueue(runtime, "demo.record", [tag], queue) for _ in range(PREFETCHED)]
    async with asyncio.timeout(WAIT):
        while not all(task_id in unacked_ids(client, settings) for task_id in records):
            await asyncio.sleep(0.1)
    assert client.llen(f"{settings.key_prefix}{queue}") == 0  # all taken by the worker
    for task_id in records:
        record = await runtime.store.get(task_id)
        assert record is not None and record.state is TaskState.QUEUED  # taken, not started
    return blocker, records, tag


def runs(client: redis.Redis, settings: Settings, tag: str) -> list[str]:
    """The task ids of every ``demo.record`` run with ``tag``, one entry per run."""
    entries: list[bytes] = client.lrange(f"{settings.key_prefix}taskgate-demo-runs", 0, -1)  # type: ignore[assignment]
    texts = [entry.decode() for entry in entries]
    return [text.split("|")[1] for text in texts if text.startswith(f"{tag}|")]


def lines(log_path: Path, *words: str) -> int:
    text = log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if all(word in line for word in words))


async def all_succeed(runtime: Runtime, task_ids: list[str]) -> None:
    for task_id in task_ids:
        record = await wait_for(runtime, task_id, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)
        assert record.state is TaskState.SUCCEEDED, (task_id, record.state, record.error)


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(settings.broker_url)
    yield connection
    connection.close()


async def test_a_killed_workers_prefetched_tasks_run_once_on_the_next_worker(
    settings: Settings, tmp_path: Path, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.usecases.recovery")
    queue, first_node = f"pre-{uuid.uuid4().hex[:8]}", f"dead-{uuid.uuid4().hex[:8]}@prefetch"
    async with gateway(fast(settings, worker_lost_timeout=3.0)) as runtime:
        with worker(runtime.settings, tmp_path / "first.log", first_node, queue) as first:
            blocker, records, tag = await prefetch(runtime, client, queue, first_node, sleep=8)
            async with asyncio.timeout(WAIT):
                while not await watched(runtime, first_node):
                    await asyncio.sleep(0.2)
            kill_group(first)
        second_log = tmp_path / "second.log"
        with worker(runtime.settings, second_log, f"next-{uuid.uuid4().hex[:8]}@prefetch", queue):
            await all_succeed(runtime, [*records, blocker])
            await asyncio.sleep(3)  # several passes: room for a duplicate run to show itself
    assert sorted(runs(client, settings, tag)) == sorted(records)  # each exactly once
    assert lines(tmp_path / "first.log", "succeeded") == 0
    assert lines(second_log, blocker, "succeeded") == 1  # re-run: it opted in (acks_late)
    assert "restored to their queue" in caplog.text  # by the recovery pass, not kombu's hour


async def test_a_live_workers_waiting_prefetched_tasks_are_left_alone(
    settings: Settings, tmp_path: Path, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.usecases.recovery")
    queue, node = f"pre-{uuid.uuid4().hex[:8]}", f"live-{uuid.uuid4().hex[:8]}@prefetch"
    log_path = tmp_path / "live.log"
    async with gateway(fast(settings)) as runtime:
        with worker(runtime.settings, log_path, node, queue):
            # the records wait ~8 s behind the sleep: several passes see them taken > 2 s ago
            blocker, records, tag = await prefetch(runtime, client, queue, node, sleep=8)
            await all_succeed(runtime, [blocker, *records])
            await asyncio.sleep(3)
    assert sorted(runs(client, settings, tag)) == sorted(records)
    for task_id in records:
        assert lines(log_path, f"[{task_id}] received") == 1  # delivered once: never restored
    assert "restored to their queue" not in caplog.text


async def test_a_live_workers_message_restored_anyway_still_runs_once(
    settings: Settings, tmp_path: Path, client: redis.Redis
) -> None:
    """A live worker that did not answer in time loses nothing but a duplicate delivery: the
    run-once guard lets one of the two deliveries of each task run."""
    queue, node = f"pre-{uuid.uuid4().hex[:8]}", f"slow-{uuid.uuid4().hex[:8]}@prefetch"
    first_log, second_log = tmp_path / "slow.log", tmp_path / "other.log"
    # the pass itself never restores here: only what the test restores by hand is duplicated
    async with gateway(fast(settings, lost_queued_after=3600.0)) as runtime:
        with worker(runtime.settings, first_log, node, queue):
            blocker, records, tag = await prefetch(runtime, client, queue, node, sleep=8)
            inspector = BrokerInspector.from_settings(runtime.settings)
            assert inspector is not None
            try:
                taken = await inspector.taken(records, before=float("inf"))
                assert taken is not None and sorted(taken) == sorted(records)
                for task_id in records:
                    assert await inspector.restore(taken[task_id], queue)
            finally:
                await inspector.aclose()
            with worker(runtime.settings, second_log, f"other-{uuid.uuid4().hex[:8]}@prefetch", queue):
                await all_succeed(runtime, [*records, blocker])
                async with asyncio.timeout(WAIT):  # the later delivery of each is skipped
                    while lines(first_log, "skipped") + lines(second_log, "skipped") < PREFETCHED:
                        await asyncio.sleep(0.2)
                await asyncio.sleep(2)
    assert sorted(runs(client, settings, tag)) == sorted(records)  # each exactly once
    for task_id in records:
        received = lines(first_log, f"[{task_id}] received") + lines(second_log, f"[{task_id}] received")
        assert received == 2  # delivered twice, run once
