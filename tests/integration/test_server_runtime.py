"""The server process: port sharing only on request, Health/List, health while a dependency is down."""

from __future__ import annotations

import asyncio
import logging

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.server import SERVICE_NAME
from service.app import Runtime
from service.config import Settings
from service.store.tasks import TaskStore
from tests.processes import run_serve, start_gateway


async def test_a_second_server_on_a_port_in_use_fails_fast(settings: Settings) -> None:
    first = await start_gateway(settings)
    try:
        second = await run_serve(settings, TASKGATE_LISTEN=first.target)
        output, _ = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode != 0
        text = output.decode(errors="replace")
        assert f"cannot listen on {first.target}" in text and "TASKGATE_REUSE_PORT" in text
    finally:
        await first.stop()


async def test_replicas_share_a_port_only_when_asked(settings: Settings) -> None:
    first = await start_gateway(settings, TASKGATE_REUSE_PORT="1")
    try:
        second = await start_gateway(settings, TASKGATE_LISTEN=first.target, TASKGATE_REUSE_PORT="1")
        assert second.port == first.port
        await second.stop()
    finally:
        await first.stop()


async def test_health_list_names_every_service(runtime: Runtime, server_port: int) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await runtime.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        answer = await stub.List(health_pb2.HealthListRequest(), timeout=10)
    assert set(answer.statuses) >= {"", SERVICE_NAME}
    assert answer.statuses[SERVICE_NAME].status == health_pb2.HealthCheckResponse.SERVING


async def test_health_is_not_serving_while_the_database_is_unreachable(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    broken = settings.model_copy(update={"database_url": "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"})
    # only the health step is exercised: the store's ping fails (nothing listens on port 1)
    healthy = await Runtime.start(settings)
    try:
        dead_store = TaskStore.connect(broken.database_url)
        healthy.store, live_store = dead_store, healthy.store
        try:
            with caplog.at_level(logging.WARNING, logger="service.app"):
                assert await healthy.check_health() is False
                await healthy._health_step()
            status = healthy.health._server_status[SERVICE_NAME]
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert any("NOT_SERVING" in r.getMessage() for r in caplog.records)
        finally:
            healthy.store = live_store
            await dead_store.close()
        await healthy._health_step()
        assert healthy.health._server_status[SERVICE_NAME] == health_pb2.HealthCheckResponse.SERVING
    finally:
        healthy.hub.begin_shutdown()
        await healthy.stop()
