"""The durable state feed and the full reconcile, against the real stack.

Every test runs on a database of its own and a key prefix of its own (the session's
gateway would otherwise relay, reconcile or consume these tasks: any replica on one
database does). Entries are XADDed in the worker library's format ({"id", "doc"}) where the
test must control them; one test has a real worker write them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from grpc import aio

from service.config import Settings
from service.domain.errors import DatabaseUnavailable
from service.domain.model import TaskState, TaskUpdate
from service.results.feed import StateFeed
from service.results.hub import ProgressHub
from service.results.recorder import Recorder
from service.store.migrate import upgrade
from service.store.tasks import TaskStore
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.worker.contract import STATE_FEED_GROUP, RedisKeys
from tests.conftest import REDIS_URL, _admin, database_url, start_worker, stop_process
from tests.helpers import args, value, wait_state
from tests.processes import GatewayProcess, gateway_process
from tests.store.support import at, new_task
from tests.store.test_unavailable import set_allow_connections

FAST = {"TASKGATE_OUTBOX_POLL_INTERVAL": "0.2", "TASKGATE_SHUTDOWN_GRACE": "1"}
NOBODY = "nobody-listens"  # a queue no worker consumes: the test plays the worker


@pytest.fixture
def private_db(run_id: str) -> Iterator[str]:
    """The name of a migrated database of the test's own; dropped afterwards."""
    name = f"taskgate_feed_{run_id}_{uuid.uuid4().hex[:6]}"
    upgrade(database_url(name))
    yield name
    _admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def feed_settings(settings: Settings, private_db: str) -> Settings:
    """The run's settings on the private database and a key prefix of the test's own."""
    prefix = f"{settings.key_prefix}{uuid.uuid4().hex[:6]}-"
    return settings.model_copy(update={"database_url": database_url(private_db), "key_prefix": prefix})


@pytest.fixture
async def store(feed_settings: Settings) -> AsyncIterator[TaskStore]:
    store = TaskStore.connect(feed_settings.database_url, pool_size=2)
    yield store
    await store.close()


@pytest.fixture
async def hub(feed_settings: Settings) -> AsyncIterator[ProgressHub]:
    """A hub that is not subscribed (its snapshots are what the tests use)."""
    hub = ProgressHub(REDIS_URL, feed_settings.task_meta_prefix, lambda update: None)
    yield hub
    await hub.close()


def doc(task_id: str, status: str, result: Any = None, **extra: Any) -> str:
    """A result document as Celery stores it."""
    return json.dumps({"status": status, "result": result, "task_id": task_id, "traceback": None, **extra})


def xadd(client: redis.Redis, settings: Settings, task_id: str, document: str) -> None:
    """Append an entry as the worker library does."""
    client.xadd(RedisKeys(settings.key_prefix).state_feed, {"id": task_id, "doc": document})


def pending(client: redis.Redis, settings: Settings) -> int:
    """How many entries of the feed are read but not acknowledged."""
    summary = client.xpending(RedisKeys(settings.key_prefix).state_feed, STATE_FEED_GROUP)
    return int(summary["pending"])


@contextlib.asynccontextmanager
async def stub_for(gateway: GatewayProcess) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    async with aio.insecure_channel(gateway.target) as channel:
        yield pb_grpc.TaskServiceStub(channel)


async def enqueue_all(gateway: GatewayProcess, requests: list[pb.EnqueueRequest]) -> list[str]:
    async with stub_for(gateway) as stub:
        return [(await stub.Enqueue(request)).task_id for request in requests]


async def test_states_written_while_the_gateway_was_down_are_recorded(
    feed_settings: Settings, redis_client: redis.Redis
) -> None:
    # the gateway is down while every task runs and ends, and no result key is left
    # (expired, evicted, or Redis restarted): only the feed knows what happened
    async with gateway_process(feed_settings, **FAST) as gateway:
        request = pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue=NOBODY)
        task_ids = await enqueue_all(gateway, [request] * 15)
        await gateway.stop()
    succeeded, failed = task_ids[:10], task_ids[10:]
    for task_id in task_ids:
        xadd(redis_client, feed_settings, task_id, doc(task_id, "STARTED", {"pid": 1, "hostname": "w@h"}))
        progress = {"current": 3, "total": 3, "message": "step 3 of 3"}
        xadd(redis_client, feed_settings, task_id, doc(task_id, "PROGRESS", progress))
    for task_id in succeeded:
        xadd(
            redis_client, feed_settings, task_id, doc(task_id, "SUCCESS", 3, date_done="2030-01-01T00:00:00")
        )
    error = {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}
    for task_id in failed:
        xadd(redis_client, feed_settings, task_id, doc(task_id, "FAILURE", error))
    async with gateway_process(feed_settings, **FAST) as gateway, stub_for(gateway) as stub:
        for task_id in succeeded:
            task = await wait_state(stub, task_id, timeout=30)
            assert task.state == pb.TASK_STATE_SUCCEEDED and value(task.result) == 3
            assert task.progress.current == 3 and task.progress.message == "step 3 of 3"
        for task_id in failed:
            task = await wait_state(stub, task_id, timeout=30)
            assert task.state == pb.TASK_STATE_FAILED and task.error.type == "ValueError"
            assert task.progress.current == 3
        deadline = time.monotonic() + 10
        while pending(redis_client, feed_settings):  # acknowledged once written
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_a_real_worker_feeds_states_that_expired_while_the_gateway_was_down(
    feed_settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys = RedisKeys(feed_settings.key_prefix)
    worker = start_worker(
        feed_settings, tmp_path / "worker.log", f"feed-{uuid.uuid4().hex[:6]}", concurrency=4
    )
    try:
        async with gateway_process(feed_settings, **FAST) as gateway:
            requests = [pb.EnqueueRequest(task_name="demo.add", args=args(i, 1)) for i in range(6)]
            requests += [pb.EnqueueRequest(task_name="demo.progress", args=args(3, 0.05)) for _ in range(3)]
            requests += [pb.EnqueueRequest(task_name="demo.fail", args=args("boom")) for _ in range(3)]
            task_ids = await enqueue_all(gateway, requests)
            await gateway.stop()
        deadline = time.monotonic() + 60
        while not all(_terminal_in_redis(redis_client, keys, task_id) for task_id in task_ids):
            assert time.monotonic() < deadline, "the worker did not finish the tasks"
            await asyncio.sleep(0.2)
    finally:
        stop_process(worker)
    fed = {entry[1][b"id"].decode() for entry in redis_client.xrange(keys.state_feed)}
    assert set(task_ids) <= fed  # taskgate.worker appends every state to the feed
    redis_client.delete(*[keys.task_meta(task_id) for task_id in task_ids])  # the results expired
    async with gateway_process(feed_settings, **FAST) as gateway, stub_for(gateway) as stub:
        tasks = [await wait_state(stub, task_id, timeout=30) for task_id in task_ids]
    assert [value(task.result) for task in tasks[:6]] == [i + 1 for i in range(6)]
    assert all(task.state == pb.TASK_STATE_SUCCEEDED for task in tasks[:9])
    assert all(task.progress.current == 3 and task.progress.total == 3 for task in tasks[6:9])
    assert all(task.state == pb.TASK_STATE_FAILED and "boom" in task.error.message for task in tasks[9:])


def _terminal_in_redis(client: redis.Redis, keys: RedisKeys, task_id: str) -> bool:
    raw = client.get(keys.task_meta(task_id))
    return raw is not None and json.loads(raw)["status"] in ("SUCCESS", "FAILURE")


async def _published(store: TaskStore, count: int) -> list[str]:
    news = [new_task() for _ in range(count)]
    await store.insert_batch(news)
    await store.mark_published([new.task_id for new in news], at(0))
    return [new.task_id for new in news]


async def test_no_ack_while_the_database_refuses_connections(
    feed_settings: Settings, private_db: str, store: TaskStore, hub: ProgressHub, redis_client: redis.Redis
) -> None:
    task_ids = await _published(store, 3)
    feed = StateFeed(REDIS_URL, feed_settings.keys.state_feed, store, hub, consumer="c1", block=0.1)
    try:
        await feed.step()  # creates the group; nothing to read yet
        for task_id in task_ids:
            xadd(redis_client, feed_settings, task_id, doc(task_id, "SUCCESS", 7))
        await set_allow_connections(private_db, False)
        for _ in range(3):  # the first read, then re-reads of the pending entries
            with pytest.raises(DatabaseUnavailable):
                await feed.step()
            assert pending(redis_client, feed_settings) == 3
        await set_allow_connections(private_db, True)
        await feed.step()
        assert pending(redis_client, feed_settings) == 0
        for task_id in task_ids:
            record = await store.get(task_id)
            assert record is not None and record.state is TaskState.SUCCEEDED and record.result == 7
    finally:
        await feed.close()


async def test_a_stopping_gateway_finishes_the_round_in_hand(
    feed_settings: Settings, store: TaskStore, hub: ProgressHub, redis_client: redis.Redis
) -> None:
    # cancelled mid-round (the gateway stopping), the round still writes and acknowledges
    # what it read: left pending under this process's consumer name, the entries would wait
    # for another replica's takeover (claim_idle, 60 s by default), and that consumer leaves
    # the group once it holds nothing
    (task_id,) = await _published(store, 1)
    feed = StateFeed(REDIS_URL, feed_settings.keys.state_feed, store, hub, consumer="c1", block=0.1, linger=1)
    try:
        await feed.step()  # creates the group
        xadd(redis_client, feed_settings, task_id, doc(task_id, "SUCCESS", 7))
        round_ = asyncio.create_task(feed.step())
        deadline = time.monotonic() + 10
        while not pending(redis_client, feed_settings):  # read: now lingering for more
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        round_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await round_
    finally:
        await feed.close()
    assert pending(redis_client, feed_settings) == 0
    record = await store.get(task_id)
    assert record is not None and record.state is TaskState.SUCCEEDED and record.result == 7
    consumers = redis_client.xinfo_consumers(RedisKeys(feed_settings.key_prefix).state_feed, STATE_FEED_GROUP)
    assert [consumer["name"] for consumer in consumers] == []


async def test_a_refused_update_is_acknowledged_and_the_rest_written(
    feed_settings: Settings, store: TaskStore, hub: ProgressHub, redis_client: redis.Redis
) -> None:
    good, bad = await _published(store, 2)
    feed = StateFeed(REDIS_URL, feed_settings.keys.state_feed, store, hub, consumer="c1", block=0.1)
    try:
        await feed.step()
        xadd(redis_client, feed_settings, bad, doc(bad, "RETRY", None, retries=2**40))  # no int4
        xadd(redis_client, feed_settings, good, doc(good, "SUCCESS", 1))
        xadd(redis_client, feed_settings, "junk", "not json at all")
        await feed.step()
        assert pending(redis_client, feed_settings) == 0
        stored_good, stored_bad = await store.get(good), await store.get(bad)
        assert stored_good is not None and stored_good.state is TaskState.SUCCEEDED
        assert stored_bad is not None and stored_bad.state is TaskState.QUEUED
    finally:
        await feed.close()


async def test_a_dead_consumers_entries_are_taken_over(
    feed_settings: Settings, store: TaskStore, hub: ProgressHub, redis_client: redis.Redis
) -> None:
    stream = feed_settings.keys.state_feed
    task_ids = await _published(store, 5)
    redis_client.xgroup_create(stream, STATE_FEED_GROUP, id="0", mkstream=True)
    for task_id in task_ids:
        xadd(redis_client, feed_settings, task_id, doc(task_id, "SUCCESS", 5))
    # a replica read them, then died before writing and acknowledging
    taken = redis_client.xreadgroup(STATE_FEED_GROUP, "dead-replica", {stream: ">"}, count=100)
    assert len(taken[0][1]) == 5
    feed = StateFeed(REDIS_URL, stream, store, hub, consumer="alive", block=0.1, claim_idle=0.5)
    try:
        await feed.step()  # too soon: the entries are not idle long enough yet
        assert pending(redis_client, feed_settings) == 5
        await asyncio.sleep(0.6)
        deadline = time.monotonic() + 10
        while pending(redis_client, feed_settings):
            assert time.monotonic() < deadline
            await feed.step()
    finally:
        await feed.close()
    for task_id in task_ids:
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.SUCCEEDED and record.result == 5


async def test_one_reconcile_pass_reaches_past_a_thousand_dead_tasks(
    feed_settings: Settings, store: TaskStore, hub: ProgressHub, redis_client: redis.Redis
) -> None:
    # 1,200 leftovers RUNNING since long ago, with nothing in Redis (their worker died, their
    # keys expired), updated before 50 tasks whose end is only in Redis (a missed message)
    dead = await _published(store, 1200)
    await store.apply_updates([TaskUpdate(task_id, TaskState.RUNNING, at(1)) for task_id in dead])
    live = await _published(store, 50)
    await store.apply_updates([TaskUpdate(task_id, TaskState.RUNNING, at(60)) for task_id in live])
    assert set(await store.active_ids(1000)).isdisjoint(live)  # the oldest 1,000: all dead
    keys = RedisKeys(feed_settings.key_prefix)
    redis_client.mset({keys.task_meta(task_id): doc(task_id, "SUCCESS", 9) for task_id in live})
    recorder = Recorder(store)
    assert await recorder.reconcile(hub) == 50
    await recorder.flush()
    for task_id in live:
        record = await store.get(task_id)
        assert record is not None and record.state is TaskState.SUCCEEDED and record.result == 9
