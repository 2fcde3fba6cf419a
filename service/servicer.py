"""The TaskService servicer: decode, call the use case, encode. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from service import convert
from service.errors import grpc_errors
from service.gateway import Gateway
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

Context = aio.ServicerContext[Any, Any]


class TaskServicer(pb_grpc.TaskServiceServicer):
    """Implements taskgate.v1.TaskService on top of the Gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    @grpc_errors
    async def Enqueue(self, request: pb.EnqueueRequest, context: Context) -> pb.EnqueueResponse:  # noqa: N802
        accepted = await self._gateway.enqueue(convert.enqueue_spec(request))
        return pb.EnqueueResponse(
            task_id=accepted.task_id,
            state=convert.state_to_proto(accepted.state),
            deduplicated=accepted.deduplicated,
        )

    @grpc_errors
    async def EnqueueAt(self, request: pb.EnqueueAtRequest, context: Context) -> pb.EnqueueAtResponse:  # noqa: N802
        accepted = await self._gateway.enqueue(convert.enqueue_at_spec(request))
        return pb.EnqueueAtResponse(
            task_id=accepted.task_id,
            state=convert.state_to_proto(accepted.state),
            deduplicated=accepted.deduplicated,
        )

    @grpc_errors
    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.GetStatusResponse:  # noqa: N802
        record = await self._gateway.get(convert.task_id_of(request))
        return pb.GetStatusResponse(task=convert.task_to_proto(record))

    @grpc_errors
    async def StreamProgress(  # noqa: N802
        self, request: pb.StreamProgressRequest, context: Context
    ) -> AsyncIterator[pb.StreamProgressResponse]:
        async for record in self._gateway.watch(convert.task_id_of(request)):
            yield pb.StreamProgressResponse(task=convert.task_to_proto(record))
