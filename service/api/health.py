"""The standard ``grpc.health.v1.Health`` service, with ``List`` as well as Check and Watch."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer plus ``List``: every service's status at once."""

    async def List(  # noqa: N802 - the gRPC method name
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        """The status of every registered service (``""`` is the whole server)."""
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)
