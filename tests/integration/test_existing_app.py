"""An existing Celery app (examples/existing_app, outside workers/) behind a gateway.

A real worker of ``myapp.celery_app`` and a ``taskgate serve`` process pointed at it with
``TASKGATE_WORKERS_APP``, both on a key prefix of their own (so the run's demo worker never
takes these tasks). Tasks go in through gRPC and are streamed to the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from celery import Celery
from grpc import aio

from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.worker.contract import RedisKeys, common_conf
from tests.conftest import ROOT, child_env, stop_process
from tests.helpers import enqueue, value
from tests.processes import GatewayProcess, start_gateway

APP_DIR = ROOT / "examples" / "existing_app"
APP = "myapp.celery_app:app"


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(APP_DIR), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="module")
def app_settings(settings: Settings) -> Settings:
    """The run's settings on a key prefix of this module's own."""
    return settings.model_copy(update={"key_prefix": f"{settings.key_prefix}app-"})


@pytest.fixture(scope="module")
def app_worker(app_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real worker of the example app; yields the path of its log."""
    log_path = tmp_path_factory.mktemp("existing-app") / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "myapp.celery_app", "worker",
        "-P", "threads", "-c", "2", "-n", "existing-app@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip
    env = child_env(app_settings, PYTHONPATH=_pythonpath())
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield log_path
    stop_process(process)


@pytest.fixture(scope="module")
async def app_gateway(app_settings: Settings, app_worker: Path) -> AsyncIterator[GatewayProcess]:
    """A gateway process whose catalog is the example app's tasks."""
    gateway = await start_gateway(app_settings, TASKGATE_WORKERS_APP=APP, PYTHONPATH=_pythonpath())
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.fixture(scope="module")
async def app_stub(app_gateway: GatewayProcess) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    async with aio.insecure_channel(app_gateway.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        yield pb_grpc.TaskServiceStub(channel)


async def _stream(stub: pb_grpc.TaskServiceStub, task_id: str) -> list[pb.Task]:
    request = pb.StreamProgressRequest(task_id=task_id)
    return [m.task async for m in stub.StreamProgress(request, timeout=60)]


async def test_progress_reported_with_taskgate_reaches_the_stream(app_stub: pb_grpc.TaskServiceStub) -> None:
    task_id = await enqueue(app_stub, "reports.build", 4, interval=0.2)
    messages = await _stream(app_stub, task_id)
    assert messages[-1].state == pb.TASK_STATE_SUCCEEDED
    assert value(messages[-1].result) == {"pages": 4}
    progress = [m.progress for m in messages if m.HasField("progress")]
    assert {1, 2, 3, 4} <= {p.current for p in progress}
    assert all(p.total == 4 for p in progress)
    assert "rendered page 4 of 4" in {p.message for p in progress}
    assert value(progress[-1].details)["page"] == 4


async def test_plain_update_state_progress_reaches_the_stream(app_stub: pb_grpc.TaskServiceStub) -> None:
    task_id = await enqueue(app_stub, "reports.count", 3, interval=0.2)
    messages = await _stream(app_stub, task_id)
    assert messages[-1].state == pb.TASK_STATE_SUCCEEDED
    assert value(messages[-1].result) == 3
    assert {1, 2, 3} <= {m.progress.current for m in messages if m.HasField("progress")}
    assert messages[-1].task_name == "reports.count"


async def test_catalog_is_the_apps_tasks(app_stub: pb_grpc.TaskServiceStub) -> None:
    for name, arguments in (("demo.add", (1, 2)), ("reports.build", (1, 2, 3))):
        with pytest.raises(aio.AioRpcError) as caught:
            await enqueue(app_stub, name, *arguments)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _send_twice(settings: Settings, task_id: str) -> None:
    sender = Celery("existing-app-test", set_as_current=False)
    sender.conf.update(common_conf(settings), result_backend=None)
    try:
        for _ in range(2):
            sender.send_task("reports.count", args=[1], kwargs={"interval": 0}, task_id=task_id)
    finally:
        sender.close()


async def test_a_second_delivery_is_skipped(
    app_settings: Settings, app_worker: Path, redis_client: redis.Redis
) -> None:
    task_id = f"twice-{uuid.uuid4().hex}"
    await asyncio.to_thread(_send_twice, app_settings, task_id)
    keys = RedisKeys(app_settings.key_prefix)

    async def skipped() -> bool:
        log = await asyncio.to_thread(app_worker.read_text, errors="replace")
        return f"task_id={task_id} skipped" in log

    def succeeded() -> bool:
        return b'"SUCCESS"' in (redis_client.get(keys.task_meta(task_id)) or b"")

    deadline = time.monotonic() + 60
    while not (succeeded() and await skipped()):
        assert time.monotonic() < deadline, "the task did not run exactly once"
        await asyncio.sleep(0.2)
    assert redis_client.exists(keys.run_claim(task_id, 0))
