"""RUNNING tasks a live worker no longer holds reach a true terminal state
(service.usecases.recovery ``lost_runs``), on the real stack.

This is what Redis restarted empty leaves behind: a task whose final state was written to
the lost Redis before the gateway read it reads RUNNING on a worker that heartbeats fine.
The test reproduces it directly: rows forced RUNNING on a live private worker for tasks
that worker never received, with no result key and no run claim. Meanwhile the same worker
runs a long ``demo.sleep`` that reports nothing, so the pass asks about it on every round:
it must be left alone. The gateway runs a pass every second and looks at runs silent for
2 s (``fast``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from pathlib import Path

import orjson
import pytest
import redis
import sqlalchemy as sa

from service.app import Runtime
from service.config import Settings
from service.domain.model import TaskState
from service.results.recovery import ResultKeys, stream_id
from service.runtime.redis_pool import small_pool
from service.store.tables import tasks
from taskgate.worker.contract import RedisKeys
from tests.integration.test_recovery import WAIT, enqueue, fast, gateway, private_worker, wait_for, watched


async def force_running(
    runtime: Runtime, client: redis.Redis, task_ids: list[str], node: str, queue: str, parked: str
) -> None:
    """Turn published tasks parked on ``parked`` (a queue nobody reads) into runs that
    ``node`` started a minute ago on ``queue`` and that no worker holds: their messages are
    deleted and their rows say RUNNING."""
    key = f"{runtime.settings.key_prefix}{parked}"
    async with asyncio.timeout(WAIT):
        while client.llen(key) < len(task_ids):
            await asyncio.sleep(0.1)
    client.delete(key)
    minute_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    statement = (
        sa.update(tasks)
        .where(tasks.c.task_id.in_(task_ids))
        .values(
            state=TaskState.RUNNING.value,
            worker=node,
            queue=queue,
            start_time=minute_ago,
            update_time=minute_ago,
            publish_after=None,
        )
    )
    async with runtime.store.engine.begin() as conn:
        assert (await conn.execute(statement)).rowcount == len(task_ids)


def lines(log_path: Path, *words: str) -> int:
    text = log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if all(word in line for word in words))


async def test_runs_a_live_worker_no_longer_holds_end_true_and_its_long_run_is_untouched(
    settings: Settings, tmp_path: Path, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.usecases.recovery")
    queue, parked = f"orph-{uuid.uuid4().hex[:8]}", f"parked-{uuid.uuid4().hex[:8]}"
    node = f"live-{uuid.uuid4().hex[:8]}@orphans"
    tag = uuid.uuid4().hex
    log_path = tmp_path / "worker.log"
    async with gateway(fast(settings)) as runtime:
        with private_worker(runtime.settings, log_path, node, queue):
            # a long run that reports nothing: silent far beyond the 2 s bound, but held
            long = await enqueue(runtime, "demo.sleep", [12], queue)
            await wait_for(runtime, long, TaskState.RUNNING)
            async with asyncio.timeout(WAIT):
                while not await watched(runtime, node):
                    await asyncio.sleep(0.2)
            lost = await enqueue(runtime, "demo.add", [1, 2], parked)  # not opted in
            rerun = await enqueue(runtime, "demo.record", [tag], parked)  # acks_late
            finished = await enqueue(runtime, "demo.add", [2, 3], parked)
            await force_running(runtime, redis_client, [lost, rerun, finished], node, queue, parked)
            # the one whose result is still in Redis (its SUCCESS was merely never read)
            document = {
                "status": "SUCCESS",
                "result": 5,
                "traceback": None,
                "children": [],
                "date_done": dt.datetime.now(dt.UTC).isoformat(),
                "task_id": finished,
            }
            redis_client.set(runtime.settings.keys.task_meta(finished), orjson.dumps(document))

            failed = await wait_for(runtime, lost, TaskState.FAILED, TaskState.SUCCEEDED, TaskState.QUEUED)
            assert failed.state is TaskState.FAILED
            assert failed.error is not None and failed.error.type == "WorkerLost"
            assert node in failed.error.message and "no longer holds" in failed.error.message

            again = await wait_for(runtime, rerun, TaskState.SUCCEEDED, TaskState.FAILED)
            assert again.state is TaskState.SUCCEEDED, again.error

            done = await wait_for(runtime, finished, TaskState.SUCCEEDED, TaskState.FAILED)
            assert done.state is TaskState.SUCCEEDED and done.result == 5

            record = await runtime.store.get(long)
            assert record is not None and record.state is TaskState.RUNNING  # still running
            slept = await wait_for(runtime, long, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.QUEUED)
            assert slept.state is TaskState.SUCCEEDED, slept.error
            await asyncio.sleep(3)  # several passes: room for a duplicate run to show itself
    runs = [
        entry.decode() for entry in redis_client.lrange(f"{settings.key_prefix}taskgate-demo-runs", 0, -1)
    ]
    assert runs.count(f"{tag}|{rerun}") == 1  # re-run once
    assert lines(log_path, f"[{long}] received") == 1  # the long run: delivered once
    assert lines(log_path, long, "succeeded") == 1
    assert long not in caplog.text  # never named by the recovery pass
    assert lost in caplog.text and rerun in caplog.text


async def test_the_state_feed_is_settled_only_once_read_and_acknowledged_up_to_the_mark(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """``ResultKeys.feed_settled`` on a private stream and group of the real Redis."""
    keys = RedisKeys(f"{settings.key_prefix}feed-{uuid.uuid4().hex[:8]}-")
    results = ResultKeys(small_pool(settings.result_backend, "test", size=1), keys, feed_group="gateways")
    try:
        assert await results.feed_mark() is None  # no stream yet
        assert await results.feed_settled(None)
        redis_client.xgroup_create(keys.state_feed, "gateways", id="0", mkstream=True)
        first = redis_client.xadd(keys.state_feed, {"id": "a"})
        mark = await results.feed_mark()
        assert mark == stream_id(first)
        assert not await results.feed_settled(mark)  # not read yet
        redis_client.xreadgroup("gateways", "g1", {keys.state_feed: ">"}, count=1)
        assert not await results.feed_settled(mark)  # read, not acknowledged (not written)
        redis_client.xadd(keys.state_feed, {"id": "b"})  # later entries do not matter
        redis_client.xack(keys.state_feed, "gateways", first)
        assert await results.feed_settled(mark)
        # Redis restarted empty: a younger, empty stream is settled against an old mark
        redis_client.delete(keys.state_feed)
        redis_client.xgroup_create(keys.state_feed, "gateways", id="0", mkstream=True)
        assert await results.feed_settled(mark)
    finally:
        redis_client.delete(keys.state_feed)
        await results.aclose()
