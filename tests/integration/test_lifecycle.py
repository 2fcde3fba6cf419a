"""The server process: refuses an old schema, stops gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc import aio

from service.config import Settings
from service.store.migrate import ensure_database
from taskgate.client import AsyncClient, TaskState
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import _admin, database_url
from tests.helpers import args
from tests.processes import GatewayProcess, gateway_process, run_serve, start_gateway


async def test_serve_refuses_a_database_that_is_not_migrated(settings: Settings, run_id: str) -> None:
    name = f"taskgate_test_{run_id}_empty"
    url = database_url(name)
    await ensure_database(url)
    try:
        process = await run_serve(settings, DATABASE_URL=url)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 2
        assert b"taskgate migrate" in output
    finally:
        await asyncio.to_thread(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_sigterm_ends_streams_and_exits_cleanly(settings: Settings, worker: object) -> None:
    async with gateway_process(settings) as gateway:
        async with aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            accepted = await stub.Enqueue(pb.EnqueueRequest(task_name="demo.sleep", args=args(30)))
            call = stub.StreamProgress(pb.StreamProgressRequest(task_id=accepted.task_id))
            await call.read()
            code_task = asyncio.create_task(gateway.stop())
            with pytest.raises(aio.AioRpcError) as caught:
                while await call.read() is not aio.EOF:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (caught.value.details() or "")
            assert await code_task == 0
    assert b"stopped" in gateway.output


async def test_client_wait_outlives_a_gateway_restart(settings: Settings, worker: object) -> None:
    first = await start_gateway(settings)
    second: GatewayProcess | None = None
    try:
        async with AsyncClient(first.target) as client:
            task_id = await client.enqueue("demo.sleep", 2)
            waiting = asyncio.create_task(client.wait(task_id, timeout=60))
            await asyncio.sleep(0.5)
            assert await first.stop() == 0  # its stream ends UNAVAILABLE; wait() keeps calling
            await asyncio.sleep(0.5)
            assert not waiting.done()
            second = await start_gateway(settings, TASKGATE_LISTEN=first.target)
            task = await waiting
        assert task.state is TaskState.SUCCEEDED
    finally:
        for gateway in (first, second):
            if gateway is not None:
                await gateway.stop(signal.SIGKILL)
