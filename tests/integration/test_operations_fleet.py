"""ListQueues and ListWorkers against the real worker, and with no worker answering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpc import aio

from service.api.server import build_server
from service.app import Runtime
from service.broker.fleet import WorkerInspector
from service.broker.publisher import send_only_app
from service.config import Settings
from service.domain.callers import Caller
from service.domain.errors import PermissionDenied
from service.store.operations import OperationsStore
from service.usecases.operations import Operations
from taskgate.v1 import operations_service_pb2 as ops
from taskgate.v1 import operations_service_pb2_grpc as ops_grpc
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, wait_state


@pytest.fixture
async def operations_stub(
    runtime: Runtime, settings: Settings
) -> AsyncIterator[ops_grpc.OperationsServiceStub]:
    assert runtime.operations is not None
    server, port = build_server(
        runtime.gateway, runtime.health, settings.listen, operations=runtime.operations
    )
    await server.start()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield ops_grpc.OperationsServiceStub(channel)
    await server.stop(1)


async def test_list_workers_shows_the_running_worker(
    operations_stub: ops_grpc.OperationsServiceStub, run_id: str
) -> None:
    for _ in range(20):  # the session worker may still be starting
        response = await operations_stub.ListWorkers(ops.ListWorkersRequest())
        mine = [w for w in response.workers if w.hostname.startswith(f"test-{run_id}@")]
        if mine:
            break
        await asyncio.sleep(1)
    assert len(mine) == 1
    assert mine[0].concurrency == 8
    assert mine[0].queues  # at least the default queue
    assert mine[0].last_seen_time.seconds > 0


async def test_list_queues_counts_recorded_tasks_and_messages(
    operations_stub: ops_grpc.OperationsServiceStub, stub: pb_grpc.TaskServiceStub
) -> None:
    queue = "ops-test-nobody-consumes"
    await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue=queue))
    await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue=queue, priority=9))
    done = await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2)))
    await wait_state(stub, done.task_id)
    for _ in range(50):
        response = await operations_stub.ListQueues(ops.ListQueuesRequest())
        queues = {q.name: q for q in response.queues}
        if queues.get(queue) and queues[queue].broker_messages == 2:
            break
    assert queues[queue].queued == 2
    assert queues[queue].broker_messages == 2  # the plain list and a priority list


async def test_no_worker_is_an_empty_list(settings: Settings, runtime: Runtime) -> None:
    """A broker nobody consumes from: no worker answers, and that is not an error."""
    lonely = settings.model_copy(update={"key_prefix": f"{settings.key_prefix}lonely-"})
    operations = Operations(
        OperationsStore(runtime.store.engine), None, WorkerInspector(send_only_app(lonely))
    )
    try:
        assert await operations.list_workers(Caller("ops", read_all=True)) == []
        with pytest.raises(PermissionDenied):
            await operations.list_workers(Caller("someone"))
    finally:
        await operations.aclose()
