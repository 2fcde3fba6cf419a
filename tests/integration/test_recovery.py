"""Lost work is detected, not waited for (service.usecases.recovery), on the real stack.

Each test runs its own gateway runtime with short intervals (a pass every second, a worker
lost 5 s after its heartbeat key is gone, a published task looked for in the broker after
2 s) and private workers on a private queue (heartbeat every second), so the session's
worker never takes these tasks. A worker is killed with SIGKILL on its process group, as
the OOM killer or a lost host would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import redis
import sqlalchemy as sa

from service.app import Runtime
from service.config import Settings
from service.domain.model import TaskRecord, TaskSpec, TaskState
from service.store.tables import workers
from tests.conftest import child_env
from tests.helpers import worker_group

#: Seconds any one wait of these tests may take (far above what they need).
WAIT = 60.0


def fast(settings: Settings, **changes: object) -> Settings:
    """This run's settings with the short recovery intervals of these tests."""
    update = {"recovery_interval": 1.0, "worker_lost_timeout": 5.0, "lost_queued_after": 2.0, **changes}
    return settings.model_copy(update=update)


@contextmanager
def private_worker(
    settings: Settings, log_path: Path, node: str, queue: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker consuming only ``queue``, in its own process group, heartbeating every second."""
    env = child_env(settings, TASKGATE_WORKER_HEARTBEAT="1")
    with worker_group(env, log_path, "-c", "2", "-n", node, "-Q", queue) as process:
        yield process


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's whole process group and reap it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[Runtime]:
    """A gateway runtime on the session's database, stopped on leaving; every one of its
    loops must have ended by then (WAIT at most): a recovery pass left running (a lost
    cancel, see service/runtime/supervise.py) would go on deciding, with this test's catalog
    and intervals, on the next tests' workers."""
    runtime = await Runtime.start(settings)
    loops = [runtime.loops.task(name) for name in runtime.loops.names]
    try:
        yield runtime
    finally:
        runtime.hub.begin_shutdown()
        await runtime.stop()
        _, running = await asyncio.wait(loops, timeout=WAIT)
    assert not running, f"loops outlived Runtime.stop: {sorted(task.get_name() for task in running)}"


async def wait_for(runtime: Runtime, task_id: str, *states: TaskState) -> TaskRecord:
    """The task's record once it is in one of ``states``."""
    async with asyncio.timeout(WAIT):
        while True:
            record = await runtime.store.get(task_id)
            if record is not None and record.state in states:
                return record
            await asyncio.sleep(0.2)


async def enqueue(runtime: Runtime, name: str, args: list[object], queue: str) -> str:
    accepted = await runtime.gateway.enqueue(TaskSpec(task_name=name, args=args, queue=queue))
    return accepted.task_id


async def worker_of(runtime: Runtime, task_id: str) -> str | None:
    async with runtime.store.engine.connect() as conn:
        query = sa.text("SELECT worker FROM tasks WHERE task_id = :id")
        return (await conn.execute(query, {"id": task_id})).scalar()


async def watched(runtime: Runtime, node: str) -> bool:
    async with runtime.store.engine.connect() as conn:
        query = sa.select(workers.c.hostname).where(workers.c.hostname == node)
        return (await conn.execute(query)).first() is not None


def succeeded_lines(log_path: Path, task_id: str) -> int:
    text = log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if task_id in line and "succeeded" in line)


async def start_and_kill(runtime: Runtime, tmp_path: Path, task_id_of: str, node: str, queue: str) -> str:
    """Run one demo.sleep on a private worker, kill the worker's process group while the
    task is RUNNING (and the worker watched); returns the task id."""
    with private_worker(runtime.settings, tmp_path / "first.log", node, queue) as first:
        task_id = await enqueue(runtime, task_id_of, [6], queue)
        await wait_for(runtime, task_id, TaskState.RUNNING)
        assert await worker_of(runtime, task_id) == node
        async with asyncio.timeout(WAIT):
            while not await watched(runtime, node):
                await asyncio.sleep(0.2)
        kill_group(first)
    return task_id


async def test_a_task_not_opted_in_ends_failed_worker_lost(settings: Settings, tmp_path: Path) -> None:
    queue, node = f"rec-{uuid.uuid4().hex[:8]}", f"lost-{uuid.uuid4().hex[:8]}@recovery"
    # a catalog of names knows no opt-in: demo.sleep is not re-run here
    async with gateway(fast(settings, tasks="demo.sleep")) as runtime:
        task_id = await start_and_kill(runtime, tmp_path, "demo.sleep", node, queue)
        record = await wait_for(runtime, task_id, TaskState.FAILED, TaskState.SUCCEEDED)
    assert record.state is TaskState.FAILED
    assert record.error is not None
    assert record.error.type == "WorkerLost"
    assert node in record.error.message


async def test_an_opted_in_task_is_republished_and_succeeds_once(settings: Settings, tmp_path: Path) -> None:
    queue, node = f"rec-{uuid.uuid4().hex[:8]}", f"lost-{uuid.uuid4().hex[:8]}@recovery"
    async with gateway(fast(settings)) as runtime:
        assert runtime.gateway is not None
        task_id = await start_and_kill(runtime, tmp_path, "demo.sleep", node, queue)
        second_log = tmp_path / "second.log"
        with private_worker(runtime.settings, second_log, f"next-{uuid.uuid4().hex[:8]}@recovery", queue):
            record = await wait_for(runtime, task_id, TaskState.SUCCEEDED, TaskState.FAILED)
            assert record.state is TaskState.SUCCEEDED, record.error
            await asyncio.sleep(2)  # room for a duplicate run to show itself
        assert succeeded_lines(second_log, task_id) == 1
        assert succeeded_lines(tmp_path / "first.log", task_id) == 0


async def test_queued_tasks_the_broker_lost_are_republished_and_run_once(
    settings: Settings, tmp_path: Path, redis_client: redis.Redis
) -> None:
    lost_queue, kept_queue = f"rec-{uuid.uuid4().hex[:8]}", f"rec-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex
    async with gateway(fast(settings)) as runtime:
        lost = await enqueue(runtime, "demo.record", [tag], lost_queue)
        kept = await enqueue(runtime, "demo.record", [tag], kept_queue)
        lost_key, kept_key = f"{settings.key_prefix}{lost_queue}", f"{settings.key_prefix}{kept_queue}"
        async with asyncio.timeout(WAIT):
            while redis_client.llen(lost_key) < 1 or redis_client.llen(kept_key) < 1:
                await asyncio.sleep(0.1)
        redis_client.delete(lost_key)  # as a Redis restarted empty, or a flushed queue
        node = f"rec-{uuid.uuid4().hex[:8]}@recovery"
        with private_worker(runtime.settings, tmp_path / "worker.log", node, lost_queue):
            record = await wait_for(runtime, lost, TaskState.SUCCEEDED, TaskState.FAILED)
            assert record.state is TaskState.SUCCEEDED
            await asyncio.sleep(3)  # several passes: no second publish, no second run
        runs = [
            entry.decode() for entry in redis_client.lrange(f"{settings.key_prefix}taskgate-demo-runs", 0, -1)
        ]
        assert runs.count(f"{tag}|{lost}") == 1
        # the task the broker still holds was left alone: one message, never republished
        assert redis_client.llen(kept_key) == 1
        kept_record = await runtime.store.get(kept)
        assert kept_record is not None and kept_record.state is TaskState.QUEUED
