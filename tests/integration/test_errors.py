"""The error boundary: UNAVAILABLE when the database is down, INTERNAL without leaks."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from grpc import aio

from service.api.server import build_server
from service.api.status import INTERNAL_MESSAGE
from service.app import Runtime
from service.config import Settings
from service.domain.catalog import Catalog
from service.store.tasks import TaskStore
from service.usecases.tasks import Gateway
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args


class ExplodingCatalog(Catalog):
    def check(self, task_name: str, args: list[Any], kwargs: Mapping[str, Any]) -> None:
        raise RuntimeError("secret-internal-detail")


async def serve_gateway(
    gateway: Gateway, runtime: Runtime, settings: Settings
) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    server, port = build_server(gateway, runtime.health, settings.listen)
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.TaskServiceStub(channel)
    finally:
        await server.stop(0)


@pytest.fixture
async def broken_db_stub(runtime: Runtime, settings: Settings) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    store = TaskStore.connect("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    gateway = Gateway(store, Catalog.from_app("workers:app"), runtime.outbox, runtime.hub, runtime.recorder)
    async for stub in serve_gateway(gateway, runtime, settings):
        yield stub
    await store.close()


@pytest.fixture
async def exploding_stub(runtime: Runtime, settings: Settings) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    gateway = Gateway(runtime.store, ExplodingCatalog({}), runtime.outbox, runtime.hub, runtime.recorder)
    async for stub in serve_gateway(gateway, runtime, settings):
        yield stub


async def test_database_down_is_unavailable(broken_db_stub: pb_grpc.TaskServiceStub) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await broken_db_stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(aio.AioRpcError) as caught:
        await broken_db_stub.GetStatus(pb.GetStatusRequest(task_id="anything"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:1" not in (caught.value.details() or "")


async def test_internal_errors_are_logged_not_leaked(
    exploding_stub: pb_grpc.TaskServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="service.api.status"):
        with pytest.raises(aio.AioRpcError) as caught:
            await exploding_stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2)))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == INTERNAL_MESSAGE
    assert "secret-internal-detail" in caplog.text
    assert "Traceback" in caplog.text


async def test_garbage_bytes_do_not_reach_a_handler(server_port: int) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        call = channel.unary_unary("/taskgate.v1.TaskService/Enqueue")
        with pytest.raises(aio.AioRpcError) as caught:
            await call(b"\xff\xff\xff\xff not a protobuf")
    assert caught.value.code() in (
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_reserved_headers_are_refused(stub: pb_grpc.TaskServiceStub) -> None:
    request = pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), headers={"task": "celery.ping"})
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Enqueue(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task" in (caught.value.details() or "")


async def test_health_follows_the_database(runtime: Runtime) -> None:
    assert await runtime.check_health()
    broken = TaskStore.connect("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    try:
        assert not await dataclasses.replace(runtime, store=broken).check_health()
    finally:
        await broken.close()
