"""Broker fixtures: the same tests on Redis and on RabbitMQ.

RabbitMQ runs on ``TASKGATE_TEST_AMQP`` (default ``amqp://guest:guest@127.0.0.1:5672``);
every test run gets its own vhost (``rabbitmqctl add_vhost``, removed at the end), every
test its own database and key prefix, and a fresh ``celery`` queue on the vhost. Import the
fixtures into a test module: ``from tests.amqp_fixtures import broker_settings, ...``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
import redis
from grpc import aio

from service.config import Settings
from service.store.migrate import upgrade
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import REDIS_URL, ROOT, _admin, child_env, database_url, stop_process
from tests.processes import GatewayProcess

AMQP_BASE = os.environ.get("TASKGATE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
BROKERS = ("redis", "amqp")
#: Gateway settings that make the outbox's relay and shutdown quick.
FAST = {"TASKGATE_PUBLISH_LEASE": "2", "TASKGATE_OUTBOX_POLL_INTERVAL": "0.2", "TASKGATE_SHUTDOWN_GRACE": "1"}


def rabbitmqctl(*args: str, timeout: float = 120) -> None:
    """Run ``rabbitmqctl`` (fails the test if it fails)."""
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


def rabbit_available() -> bool:
    """True when rabbitmqctl is installed and the node answers."""
    if shutil.which("rabbitmqctl") is None:
        return False
    return subprocess.run(["rabbitmqctl", "ping"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="session")
def amqp_vhost(run_id: str) -> Iterator[str]:
    """The URL of this run's private vhost on the test RabbitMQ."""
    if not rabbit_available():
        pytest.skip("RabbitMQ is not running (rabbitmqctl ping failed)")
    # each module importing this fixture gets its own instance: one vhost each
    name = f"tgtest-{run_id}-{uuid.uuid4().hex[:4]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield f"{AMQP_BASE}/{name}"
    with contextlib.suppress(subprocess.SubprocessError):
        rabbitmqctl("start_app")  # a test that stopped the node and failed
    rabbitmqctl("delete_vhost", name)


async def reset_queues(url: str, *names: str) -> None:
    """Delete ``names`` (queues and their exchanges) on ``url``'s vhost: no leftover
    messages, and the next declaration may choose other arguments."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        for name in names:
            channel = await connection.channel()
            await channel.queue_delete(name)
            await channel.exchange_delete(name)


@pytest.fixture(params=BROKERS)
def broker_settings(request: pytest.FixtureRequest, settings: Settings, run_id: str) -> Iterator[Settings]:
    """Settings on a private database and key prefix, with Redis or RabbitMQ as the broker
    (the result backend is Redis either way)."""
    yield from _broker_private(request, settings, run_id)


@pytest.fixture(scope="module", params=BROKERS)
def module_broker_settings(
    request: pytest.FixtureRequest, settings: Settings, run_id: str
) -> Iterator[Settings]:
    """``broker_settings`` shared by a module's tests (one database, key prefix and fresh
    ``celery`` queue per broker): for tests that share a gateway, each on tags, and where it
    matters queues, of its own."""
    yield from _broker_private(request, settings, run_id)


def _broker_private(request: pytest.FixtureRequest, settings: Settings, run_id: str) -> Iterator[Settings]:
    """The body of both broker fixtures: the broker of ``request.param`` (a fresh ``celery``
    queue on RabbitMQ) and private settings on it."""
    broker = REDIS_URL
    if request.param == "amqp":
        broker = request.getfixturevalue("amqp_vhost")
        asyncio.run(reset_queues(broker, "celery"))
    with private_settings(settings, run_id, broker) as private:
        yield private


@contextlib.contextmanager
def private_settings(settings: Settings, run_id: str, broker: str = REDIS_URL) -> Iterator[Settings]:
    """``settings`` on a new database, a new key prefix and ``broker``."""
    tag = uuid.uuid4().hex[:6]
    name = f"taskgate_test_{run_id}_{tag}"
    url = database_url(name)
    upgrade(url)
    yield settings.model_copy(
        update={"broker_url": broker, "database_url": url, "key_prefix": f"{settings.key_prefix}{tag}-"}
    )
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def is_amqp(settings: Settings) -> bool:
    """True when ``settings`` use RabbitMQ."""
    return settings.broker_url.startswith("amqp")


@contextlib.contextmanager
def broker_worker(
    settings: Settings,
    tmp_path: Path,
    concurrency: int = 16,
    *,
    pool: str = "threads",
    queues: str = "",
    name: str = "",
    stop_timeout: float = 15,
    **env: str,
) -> Iterator[Path]:
    """A real Celery worker (``tests.amqp_worker``) on ``settings``' broker; yields its log.

    ``pool`` is Celery's ``-P`` (terminate needs ``prefork``), ``queues`` its ``-Q`` (the
    default queue when empty), ``name`` the node name before ``@`` (a random one when empty).
    The worker is killed if it has not stopped ``stop_timeout`` seconds after SIGTERM: a
    threads-pool worker on RabbitMQ takes about 10 s to stop (its main loop notices the
    shutdown only when its poll times out), so tests that are done with it may pass less.
    """
    log = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
    command = [
        sys.executable, "-m", "celery", "-A", "tests.amqp_worker", "worker",
        "-P", pool, "-c", str(concurrency), "-n", f"{name or 'broker-' + uuid.uuid4().hex[:6]}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
        *(["-Q", queues] if queues else []),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=child_env(settings, **env), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield log
    finally:
        stop_process(process, stop_timeout)


def runs_by_tag(settings: Settings) -> collections.Counter[str]:
    """How many times ``demo.record`` ran with each tag (counted by the workers)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        entries = client.lrange(f"{settings.key_prefix}taskgate-demo-runs", 0, -1)
    finally:
        client.close()
    return collections.Counter(entry.decode().split("|")[0] for entry in entries)


def run_order(settings: Settings) -> list[str]:
    """The tags of ``demo.record`` in the order the workers ran them."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [
            e.decode().split("|")[0] for e in client.lrange(f"{settings.key_prefix}taskgate-demo-runs", 0, -1)
        ]
    finally:
        client.close()


async def wait_runs(settings: Settings, tags: list[str], timeout: float = 120) -> collections.Counter[str]:
    """Wait until every tag ran; then a moment more for a duplicate to show; return the counts."""
    deadline = time.monotonic() + timeout
    while not set(tags) <= set(runs_by_tag(settings)):
        if time.monotonic() > deadline:
            missing = set(tags) - set(runs_by_tag(settings))
            raise AssertionError(f"{len(missing)} of {len(tags)} tasks never ran")
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)
    return runs_by_tag(settings)


@contextlib.asynccontextmanager
async def stub_for(gateway: GatewayProcess) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    """A TaskService stub on ``gateway``."""
    async with aio.insecure_channel(gateway.target) as channel:
        yield pb_grpc.TaskServiceStub(channel)


__all__ = [
    "FAST",
    "amqp_vhost",
    "broker_settings",
    "broker_worker",
    "is_amqp",
    "module_broker_settings",
    "private_settings",
    "rabbitmqctl",
    "reset_queues",
    "run_order",
    "runs_by_tag",
    "stub_for",
    "wait_runs",
]
