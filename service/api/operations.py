"""The OperationsService servicer: queues and workers, for callers with ``read_all``."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2
from grpc import aio

from service.api.auth import Authenticator
from service.api.status import grpc_errors
from service.usecases.operations import Operations
from taskgate.v1 import operations_service_pb2 as pb
from taskgate.v1 import operations_service_pb2_grpc as pb_grpc

Context = aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OperationsService"].full_name


class OperationsServicer(pb_grpc.OperationsServiceServicer):
    """Implements taskgate.v1.OperationsService on top of the Operations use cases."""

    def __init__(self, operations: Operations, authenticator: Authenticator | None = None) -> None:
        self._operations = operations
        self._auth = authenticator or Authenticator.open()

    @grpc_errors
    async def ListQueues(self, request: pb.ListQueuesRequest, context: Context) -> pb.ListQueuesResponse:  # noqa: N802
        queues = await self._operations.list_queues(self._auth.caller_of(context))
        return pb.ListQueuesResponse(
            queues=[
                pb.QueueInfo(
                    name=q.name,
                    broker_messages=q.broker_messages,
                    queued=q.queued,
                    scheduled=q.scheduled,
                    running=q.running,
                )
                for q in queues
            ]
        )

    @grpc_errors
    async def ListWorkers(self, request: pb.ListWorkersRequest, context: Context) -> pb.ListWorkersResponse:  # noqa: N802
        workers = await self._operations.list_workers(self._auth.caller_of(context))
        infos = []
        for worker in workers:
            seen = timestamp_pb2.Timestamp()
            seen.FromDatetime(worker.seen_time)
            infos.append(
                pb.WorkerInfo(
                    hostname=worker.hostname,
                    queues=worker.queues,
                    active_task_ids=worker.active_task_ids,
                    processed=worker.processed,
                    concurrency=worker.concurrency,
                    last_seen_time=seen,
                )
            )
        return pb.ListWorkersResponse(workers=infos)
