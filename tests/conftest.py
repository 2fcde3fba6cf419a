"""Fixtures: a private database and Redis key prefix per run, a real worker, a real server.

Every run creates the PostgreSQL database ``taskgate_test_<run>`` and uses the Redis key
prefix ``tgtest-<run>-`` (broker queues, results and channels), so runs never collide;
both are removed afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
import sqlalchemy as sa
from grpc import aio
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from service.api.server import build_server
from service.app import Runtime
from service.config import Settings
from service.store.migrate import upgrade
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TASKGATE_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TASKGATE_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Generator[None, None, None]:
    """Connections still open when the session's event loop has closed are reported here,
    as printed ResourceWarnings, instead of crashing pytest after the summary.

    Inside a test a leak fails that test (``filterwarnings = error``). What is only
    collected after the last session fixture (pytest collects garbage once more when it
    unconfigures) belongs to no test, and pytest 8.4+ turns each into an exception raised
    from ``pytest_unconfigure``: the run then fails with every test passed. Collecting it
    here, with ResourceWarning shown rather than raised, keeps the leak visible in the log.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", ResourceWarning)
        yield
        for _ in range(3):
            gc.collect()


def _admin(sql: str) -> None:
    async def run() -> None:
        engine = create_async_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text(sql))
        finally:
            await engine.dispose()

    asyncio.run(run())


def database_url(name: str) -> str:
    """The URL of database ``name`` on the test PostgreSQL server."""
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def settings(run_id: str) -> Iterator[Settings]:
    """Settings of this run, on a migrated private database and a private key prefix."""
    name = f"taskgate_test_{run_id}"
    url = database_url(name)
    upgrade(url)
    prefix = f"tgtest-{run_id}-"
    yield Settings(
        database_url=url,
        broker_url=REDIS_URL,
        result_backend=REDIS_URL,
        key_prefix=prefix,
        listen="127.0.0.1:0",
        outbox_poll_interval=0.2,
        reconcile_interval=2.0,
        health_interval=1.0,
        shutdown_grace=2.0,
    )
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a worker or gateway process of this run."""
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=settings.broker_url,
        CELERY_RESULT_BACKEND=settings.result_backend,
        TASKGATE_KEY_PREFIX=settings.key_prefix,
        DATABASE_URL=settings.database_url,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_worker(
    settings: Settings, log_path: Path, name: str, concurrency: int = 8
) -> subprocess.Popen[bytes]:
    """A real Celery worker of this run (thread pool), logging to ``log_path``."""
    command = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "-P", "threads", "-c", str(concurrency), "-n", f"{name}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, cwd=ROOT, env=child_env(settings), stdout=log, stderr=subprocess.STDOUT
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Terminate a child and wait for it; kill it if it will not stop."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def worker(settings: Settings, run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One worker for the whole run; yields the path of its log."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    process = start_worker(settings, log_path, f"test-{run_id}")
    yield log_path
    stop_process(process)


@pytest.fixture(scope="session")
async def runtime(settings: Settings, worker: Path) -> AsyncIterator[Runtime]:
    """The gateway's components, running on the test loop."""
    runtime = await Runtime.start(settings)
    yield runtime
    runtime.hub.begin_shutdown()
    await runtime.stop()


@pytest.fixture(scope="session")
async def server_port(runtime: Runtime, settings: Settings) -> AsyncIterator[int]:
    """A real grpc.aio server on a free port."""
    server, port = build_server(runtime.gateway, runtime.health, settings.listen)
    await server.start()
    yield port
    await server.stop(1)


@pytest.fixture(scope="session")
async def channel(server_port: int) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        yield channel


@pytest.fixture(scope="session")
def stub(channel: aio.Channel) -> pb_grpc.TaskServiceStub:
    return pb_grpc.TaskServiceStub(channel)


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


__all__ = ["grpc"]
