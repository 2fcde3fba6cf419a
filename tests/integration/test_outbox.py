"""No task lost, none run twice: durable scheduling, broker outages, crashes, replicas.

Executions are counted on the worker's side: ``demo.record`` appends one entry per run to
a Redis list.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from grpc import aio

from service.config import Settings
from service.store.migrate import upgrade
from service.store.tasks import TaskStore, tasks
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import _admin, database_url, start_worker, stop_process
from tests.helpers import args, wait_state
from tests.processes import GatewayProcess, gateway_process, start_gateway

FAST = {"TASKGATE_PUBLISH_LEASE": "2", "TASKGATE_OUTBOX_POLL_INTERVAL": "0.2", "TASKGATE_SHUTDOWN_GRACE": "1"}


class PrivateRedis:
    """A redis-server of the test's own, which it can stop and start again on one port."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # the port was free a moment ago; make sure the server answering is ours
        assert client.info("server")["process_id"] == self.process.pid
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_settings(settings: Settings, private_redis: PrivateRedis, run_id: str) -> Iterator[Settings]:
    """Settings on a private Redis and a private database.

    Not the run's shared database: the session's own gateway would relay these tasks to
    the shared Redis, as any replica on one database does.
    """
    name = f"taskgate_test_{run_id}_{uuid.uuid4().hex[:6]}"
    url = database_url(name)
    upgrade(url)
    yield settings.model_copy(
        update={"broker_url": private_redis.url, "result_backend": private_redis.url, "database_url": url}
    )
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def private_worker(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
    process = start_worker(settings, log, f"outbox-{uuid.uuid4().hex[:6]}", concurrency=16)
    try:
        yield log
    finally:
        stop_process(process)


def runs_by_tag(client: redis.Redis, settings: Settings) -> collections.Counter[str]:
    entries = client.lrange(f"{settings.key_prefix}taskgate-demo-runs", 0, -1)
    return collections.Counter(entry.decode().split("|")[0] for entry in entries)


async def wait_runs(client: redis.Redis, settings: Settings, tags: list[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not set(tags) <= set(runs_by_tag(client, settings)):
        if time.monotonic() > deadline:
            missing = set(tags) - set(runs_by_tag(client, settings))
            raise AssertionError(f"{len(missing)} of {len(tags)} tasks never ran")
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # room for a duplicate to show up, if there were one


@contextlib.asynccontextmanager
async def stub_for(gateway: GatewayProcess) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    async with aio.insecure_channel(gateway.target) as channel:
        yield pb_grpc.TaskServiceStub(channel)


def record_request(tag: str) -> pb.EnqueueRequest:
    return pb.EnqueueRequest(task_name="demo.record", args=args(tag))


def ts(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def test_far_future_tasks_stay_out_of_the_broker_until_due(
    private_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    client = private_redis.client()
    prefix = private_settings.key_prefix
    tag = f"future-{uuid.uuid4().hex[:8]}"
    with private_worker(private_settings, tmp_path):
        async with (
            gateway_process(private_settings, TASKGATE_SCHEDULE_HORIZON="2", **FAST) as gateway,
            stub_for(gateway) as stub,
        ):
            run_time = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=8)
            accepted = await stub.EnqueueAt(
                pb.EnqueueAtRequest(task_name="demo.record", args=args(tag), run_time=ts(run_time))
            )
            assert accepted.state == pb.TASK_STATE_SCHEDULED
            while dt.datetime.now(dt.UTC) < run_time - dt.timedelta(seconds=3.5):
                queued = b"".join(client.lrange(f"{prefix}celery", 0, -1))
                held = b"".join(client.hvals(f"{prefix}unacked"))
                assert accepted.task_id.encode() not in queued + held
                status = await stub.GetStatus(pb.GetStatusRequest(task_id=accepted.task_id))
                assert status.task.state == pb.TASK_STATE_SCHEDULED
                await asyncio.sleep(0.5)
            task = await wait_state(stub, accepted.task_id, timeout=30)
            assert task.state == pb.TASK_STATE_SUCCEEDED
            assert task.start_time.ToDatetime(tzinfo=dt.UTC) >= run_time
    assert runs_by_tag(client, private_settings)[tag] == 1
    client.close()


async def test_tasks_accepted_while_the_broker_is_down_run_once_when_it_returns(
    private_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    tags = [f"outage-{uuid.uuid4().hex[:8]}-{i}" for i in range(200)]
    async with gateway_process(private_settings, **FAST) as gateway, stub_for(gateway) as stub:
        private_redis.stop()
        accepted = await asyncio.gather(*(stub.Enqueue(record_request(tag)) for tag in tags))
        assert all(a.state == pb.TASK_STATE_QUEUED for a in accepted)
        status = await stub.GetStatus(pb.GetStatusRequest(task_id=accepted[0].task_id))
        assert status.task.state == pb.TASK_STATE_QUEUED  # answered from the database
        private_redis.start()
        with private_worker(private_settings, tmp_path):
            client = private_redis.client()
            await wait_runs(client, private_settings, tags)
            counts = runs_by_tag(client, private_settings)
            assert all(counts[tag] == 1 for tag in tags)
            await wait_state(stub, accepted[-1].task_id)
            client.close()


async def test_tasks_acknowledged_before_sigkill_run_once_after_restart(
    private_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    tags = [f"crash-{uuid.uuid4().hex[:8]}-{i}" for i in range(100)]
    gateway = await start_gateway(private_settings, **FAST)
    async with stub_for(gateway) as stub:
        await asyncio.gather(*(stub.Enqueue(record_request(tag)) for tag in tags))
    await gateway.stop(signal.SIGKILL)
    with private_worker(private_settings, tmp_path):
        async with gateway_process(private_settings, **FAST):
            client = private_redis.client()
            await wait_runs(client, private_settings, tags)
            counts = runs_by_tag(client, private_settings)
            assert all(counts[tag] == 1 for tag in tags), [t for t in tags if counts[t] != 1]
            client.close()


async def test_two_replicas_dispatch_scheduled_tasks_without_duplicates(
    private_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    tags = [f"replica-{uuid.uuid4().hex[:8]}-{i}" for i in range(100)]
    env = {"TASKGATE_SCHEDULE_HORIZON": "1", **FAST}
    with private_worker(private_settings, tmp_path) as worker_log:
        async with (
            gateway_process(private_settings, **env) as first,
            gateway_process(private_settings, **env) as second,
            stub_for(first) as stub_a,
            stub_for(second) as stub_b,
        ):
            run_time = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
            accepted = await asyncio.gather(
                *(
                    (stub_a if i % 2 else stub_b).EnqueueAt(
                        pb.EnqueueAtRequest(task_name="demo.record", args=args(tag), run_time=ts(run_time))
                    )
                    for i, tag in enumerate(tags)
                )
            )
            client = private_redis.client()
            await wait_runs(client, private_settings, tags)
            assert all(count == 1 for count in runs_by_tag(client, private_settings).values())
            client.close()
        store = TaskStore.connect(private_settings.database_url)
        async with store.engine.connect() as conn:
            ids = [a.task_id for a in accepted]
            query = sa.select(tasks.c.publish_attempts).where(tasks.c.task_id.in_(ids))
            attempts = list((await conn.execute(query)).scalars())
        await store.close()
        assert attempts == [1] * len(tags)  # each row was claimed and published once
        assert "already ran" not in worker_log.read_text()
