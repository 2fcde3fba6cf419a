"""The worker side under faults: a killed worker, a duplicate delivery, a Redis blip, the feed.

Each test runs its own gateway process on a private database and key prefix, and its own
workers in process groups of their own (so a test can SIGKILL one whole), with a 1 s
worker heartbeat and a short broker visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from grpc import aio

from service.config import Settings
from service.store.migrate import upgrade
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.worker.contract import CelerySettings, RedisKeys, common_conf
from tests.conftest import REDIS_URL, ROOT, _admin, child_env, database_url, stop_process
from tests.helpers import enqueue, value, wait_state
from tests.integration.test_outbox import PrivateRedis
from tests.processes import GatewayProcess, start_gateway

#: Worker (and gateway) environment: heartbeat every 1 s (gone 3 s after a death), and
#: unacknowledged messages restored 4 s after delivery.
FAULT_ENV = {"TASKGATE_WORKER_HEARTBEAT": "1", "CELERY_VISIBILITY_TIMEOUT": "4"}
GATEWAY_ENV = {**FAULT_ENV, "TASKGATE_OUTBOX_POLL_INTERVAL": "0.2", "TASKGATE_SHUTDOWN_GRACE": "1"}


@dataclass
class WorkerProcess:
    """A Celery worker of the demo app in a process group of its own."""

    process: subprocess.Popen[bytes]
    name: str
    log: Path

    def kill(self) -> None:
        """SIGKILL the whole process group, as an OOM kill or a lost host would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_worker(settings: Settings, directory: Path, concurrency: int = 4) -> WorkerProcess:
    """Start a worker and wait until it heartbeats (that is, until ``worker_ready``)."""
    name = f"faults-{uuid.uuid4().hex[:6]}"
    log = directory / f"{name}.log"
    command = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "-P", "threads", "-c", str(concurrency), "-n", f"{name}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=child_env(settings, **FAULT_ENV),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(process, name, log)
    client = redis.Redis.from_url(settings.broker_url)
    pattern = f"{RedisKeys(settings.key_prefix).worker_heartbeat(name)}@*"
    deadline = time.monotonic() + 30
    while not list(client.scan_iter(match=pattern)):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"worker {name} never heartbeat:\n{worker.output()}")
        time.sleep(0.1)
    client.close()
    return worker


@contextlib.contextmanager
def running_worker(settings: Settings, directory: Path, concurrency: int = 4) -> Iterator[WorkerProcess]:
    worker = spawn_worker(settings, directory, concurrency)
    try:
        yield worker
    finally:
        stop_process(worker.process)


@contextlib.contextmanager
def private_database(run_id: str) -> Iterator[str]:
    name = f"taskgate_test_{run_id}_{uuid.uuid4().hex[:6]}"
    url = database_url(name)
    upgrade(url)
    try:
        yield url
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def gateway_stub(settings: Settings) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    gateway: GatewayProcess = await start_gateway(settings, **GATEWAY_ENV)
    try:
        async with aio.insecure_channel(gateway.target) as channel:
            yield pb_grpc.TaskServiceStub(channel)
    finally:
        await gateway.stop()


@pytest.fixture
def fault_settings(settings: Settings, run_id: str) -> Iterator[Settings]:
    """The run's Redis, a private database and a private key prefix."""
    with private_database(run_id) as url:
        prefix = f"{settings.key_prefix}f{uuid.uuid4().hex[:6]}-"
        yield settings.model_copy(update={"database_url": url, "key_prefix": prefix})


def feed(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of the state feed: (task id, decoded document)."""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        entries = client.xrange(RedisKeys(settings.key_prefix).state_feed)
    finally:
        client.close()
    return [(fields[b"id"].decode(), json.loads(fields[b"doc"])) for _, fields in entries]


def statuses(settings: Settings, task_id: str) -> list[str]:
    return [doc["status"] for tid, doc in feed(settings) if tid == task_id]


def sender(settings: Settings) -> Celery:
    """A send-only Celery app on the test's broker and key prefix."""
    shared = CelerySettings(
        broker_url=settings.broker_url, result_backend=settings.result_backend, key_prefix=settings.key_prefix
    )
    app = Celery("faults-sender", set_as_current=False)
    app.conf.update(common_conf(shared), result_backend=None)
    return app


async def wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_killed_worker_s_tasks_run_again_and_succeed_once(
    fault_settings: Settings, tmp_path: Path
) -> None:
    async with gateway_stub(fault_settings) as stub:
        worker = spawn_worker(fault_settings, tmp_path)
        try:
            ids = [await enqueue(stub, "demo.sleep", 3) for _ in range(2)]
            for task_id in ids:
                await wait_state(stub, task_id, [pb.TASK_STATE_RUNNING])
        finally:
            worker.kill()
        # the dead worker's heartbeat expires (3 s) and the message's visibility timeout (4 s)
        # passes, so the next worker restores it when it starts and the guard lets it run
        await asyncio.sleep(4.5)
        with running_worker(fault_settings, tmp_path) as second:
            for task_id in ids:
                task = await wait_state(stub, task_id, timeout=60)
                assert task.state == pb.TASK_STATE_SUCCEEDED
                assert value(task.result) == 3
            await asyncio.sleep(1.5)  # room for a duplicate run, if there were one
            assert "its claimed run died with its worker" in second.output()
    for task_id in ids:
        seen = statuses(fault_settings, task_id)
        assert seen.count("SUCCESS") == 1, seen
        assert seen.count("STARTED") == 2, seen  # the run that died, the run that finished


async def test_a_duplicate_of_a_failed_task_does_not_overwrite_its_failure(
    fault_settings: Settings, tmp_path: Path
) -> None:
    async with gateway_stub(fault_settings) as stub:
        with running_worker(fault_settings, tmp_path) as worker:
            task_id = await enqueue(stub, "demo.fail", "boom")
            failed = await wait_state(stub, task_id)
            assert failed.state == pb.TASK_STATE_FAILED
            app = sender(fault_settings)
            try:  # the same message again, as the outbox republishes after a crash
                app.send_task("demo.fail", args=["boom"], task_id=task_id)
            finally:
                app.close()
            await wait_for(lambda: f"task_id={task_id} skipped" in worker.output(), "the duplicate's skip")
            client = redis.Redis.from_url(fault_settings.broker_url)
            stored = json.loads(client.get(RedisKeys(fault_settings.key_prefix).task_meta(task_id)) or b"{}")
            client.close()
            assert stored["status"] == "FAILURE"
            task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
            assert task.state == pb.TASK_STATE_FAILED
            assert task.error.type == "DemoError"
    assert statuses(fault_settings, task_id) == ["STARTED", "FAILURE"]


async def test_the_feed_holds_every_state_a_worker_writes(fault_settings: Settings, tmp_path: Path) -> None:
    async with gateway_stub(fault_settings) as stub:
        with running_worker(fault_settings, tmp_path):
            progress = await enqueue(stub, "demo.progress", 3, interval=0.05)
            failing = await enqueue(stub, "demo.fail", "feed")
            flaky = await enqueue(stub, "demo.flaky", "feed")
            for task_id in (progress, failing, flaky):
                await wait_state(stub, task_id)
            expired = uuid.uuid4().hex
            app = sender(fault_settings)
            try:  # past its expiry when the worker gets it: REVOKED, without running
                app.send_task("demo.add", args=[1, 2], task_id=expired, expires=dt.datetime.now(dt.UTC))
            finally:
                app.close()
            await wait_for(lambda: "REVOKED" in statuses(fault_settings, expired), "REVOKED in the feed")
    assert statuses(fault_settings, progress) == ["STARTED", "PROGRESS", "PROGRESS", "PROGRESS", "SUCCESS"]
    assert statuses(fault_settings, failing) == ["STARTED", "FAILURE"]
    assert statuses(fault_settings, flaky) == ["STARTED", "RETRY", "STARTED", "SUCCESS"]
    docs = [doc for tid, doc in feed(fault_settings) if tid == progress]
    assert docs[-1]["result"] == 3 and docs[-1]["task_id"] == progress


async def settled(
    stub: pb_grpc.TaskServiceStub, task: pb.Task, done: Callable[[pb.Task], bool], timeout: float = 10
) -> pb.Task:
    """The terminal ``task`` as GetStatus answers it once ``done`` (or after ``timeout``
    seconds: the last answer, for the caller's assertions to explain). The first terminal
    answer may come from Redis's latest document before a racing STARTED or PROGRESS of the
    same run is recorded; the transition rule still fills those into the terminal record."""
    deadline = time.monotonic() + timeout
    while not done(task) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.task_id))).task
    return task


async def test_worker_start_time_is_before_end_time(fault_settings: Settings, tmp_path: Path) -> None:
    async with gateway_stub(fault_settings) as stub:
        with running_worker(fault_settings, tmp_path):
            task_id = await enqueue(stub, "demo.add", 1, 2)
            task = await wait_state(stub, task_id)
            task = await settled(stub, task, lambda task: task.start_time != task.end_time)
    assert task.state == pb.TASK_STATE_SUCCEEDED
    started = next(doc for tid, doc in feed(fault_settings) if tid == task_id and doc["status"] == "STARTED")
    stamped = dt.datetime.fromisoformat(started["result"]["start_time"])
    start = task.start_time.ToDatetime(tzinfo=dt.UTC)
    end = task.end_time.ToDatetime(tzinfo=dt.UTC)
    assert start == stamped  # the worker's clock, not the gateway's
    assert start < end


@pytest.fixture
def blip_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server that keeps its data across a stop (AOF, fsync always)."""
    server = PrivateRedis(tmp_path)

    def start_with_aof() -> None:
        command = ["redis-server", "--port", str(server.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(server.directory)]
        server.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    server.start = start_with_aof  # type: ignore[method-assign]
    server.start()
    yield server
    server.stop()


@pytest.fixture
def blip_settings(settings: Settings, run_id: str, blip_redis: PrivateRedis) -> Iterator[Settings]:
    """A private redis-server and a private database."""
    assert blip_redis.url != REDIS_URL
    with private_database(run_id) as url:
        yield settings.model_copy(
            update={"database_url": url, "broker_url": blip_redis.url, "result_backend": blip_redis.url}
        )


async def test_progress_tasks_survive_a_redis_blip(
    blip_settings: Settings, blip_redis: PrivateRedis, tmp_path: Path
) -> None:
    async with gateway_stub(blip_settings) as stub:
        with running_worker(blip_settings, tmp_path, concurrency=10) as worker:
            ids = [await enqueue(stub, "demo.progress", 30, interval=0.2) for _ in range(10)]
            for task_id in ids:
                await wait_state(stub, task_id, [pb.TASK_STATE_RUNNING])
            blip_redis.stop()
            await asyncio.sleep(2)
            blip_redis.start()
            tasks = [await wait_state(stub, task_id, timeout=90) for task_id in ids]
            tasks = [await settled(stub, task, lambda task: task.progress.current == 30) for task in tasks]
            # kombu 5.7's Redis transport may crash the consumer when Redis goes away
            # (CELERY_FACTS: AttributeError … 'hostname'); the running tasks still finish and
            # are recorded, which is what this test is about. Any other exit is a failure.
            assert worker.process.poll() is None or "no attribute 'hostname'" in worker.output(), (
                worker.output()
            )
    for task in tasks:
        assert task.state == pb.TASK_STATE_SUCCEEDED, task
        assert value(task.result) == 30
        written = [doc for tid, doc in feed(blip_settings) if tid == task.task_id]
        assert [doc["status"] for doc in written][-1] == "SUCCESS"
        last = [doc["result"] for doc in written if doc["status"] == "PROGRESS"][-1]
        assert (last["current"], last["total"]) == (30, 30)  # the worker wrote its final progress
        # recorded even when the SUCCESS won the race (the terminal record takes it late)
        assert (task.progress.current, task.progress.total) == (30, 30), task
