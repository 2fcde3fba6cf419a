"""The gRPC server: TaskService, health and reflection on one port (wired by ``service/app.py``)."""

from __future__ import annotations

import logging

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.auth import Authenticator, AuthInterceptor, Security
from service.api.health import HealthServicer
from service.api.limits import ServiceLimits
from service.api.operations import SERVICE_NAME as OPERATIONS_SERVICE_NAME
from service.api.operations import OperationsServicer
from service.api.schedules import ScheduleServicer
from service.api.servicer import TaskServicer
from service.api.workflows import WorkflowServicer
from service.usecases.operations import Operations
from service.usecases.schedules import Schedules
from service.usecases.tasks import Gateway
from service.usecases.workflows import Workflows
from taskgate.v1 import (
    operations_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TaskService"].full_name


def build_server(
    gateway: Gateway,
    health_servicer: HealthServicer,
    listen: str,
    *,
    security: Security | None = None,
    limits: ServiceLimits | None = None,
    reuse_port: bool = False,
    operations: Operations | None = None,
    schedules: Schedules | None = None,
    workflows: Workflows | None = None,
) -> tuple[aio.Server, int]:
    """A gRPC server with TaskService, health and reflection, bound to ``listen``.

    Args:
        gateway: The use cases.
        health_servicer: The health service (kept up to date by the runtime).
        listen: host:port; port 0 picks a free one.
        security: Who may call and the TLS credentials; None = open mode, plaintext.
        limits: Request and stream limits; None = the defaults.
        reuse_port: Let other processes bind the same port (SO_REUSEPORT, for deliberate
            replicas); off, a port in use is an error.
        operations: The operators' use cases (OperationsService); None = not offered.
        schedules: The schedule use cases (ScheduleService); None = not offered.
        workflows: The workflow use cases (WorkflowService); None = not offered.

    Returns:
        The (not yet started) server and the port it bound (useful with port 0).
    """
    security = security or Security(Authenticator.open())
    limits = limits or ServiceLimits()
    # open mode needs no interceptor, and a server without one skips a coroutine per call
    interceptors = [] if security.authenticator.is_open else [AuthInterceptor(security.authenticator)]
    server = aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # calls that arrived but are not yet handed to Python: gRPC core's defaults
            # (1,000, hard 3,000) cancel part of a reconnect storm of a full server's streams
            ("grpc.server.max_pending_requests", limits.max_streams),
            ("grpc.server.max_pending_requests_hard_limit", 3 * limits.max_streams),
        ],
    )
    servicer = TaskServicer(gateway, security.authenticator, limits)
    pb_grpc.add_TaskServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    names: tuple[str, ...] = (SERVICE_NAME, health_name, reflection.SERVICE_NAME)
    if schedules is not None:
        scheduler = ScheduleServicer(schedules, security.authenticator, limits.input)
        schedule_service_pb2_grpc.add_ScheduleServiceServicer_to_server(scheduler, server)
        names += (schedule_service_pb2.DESCRIPTOR.services_by_name["ScheduleService"].full_name,)
    if operations is not None:
        ops = OperationsServicer(operations, security.authenticator)
        operations_service_pb2_grpc.add_OperationsServiceServicer_to_server(ops, server)
        names += (OPERATIONS_SERVICE_NAME,)
    if workflows is not None:
        flows = WorkflowServicer(workflows, security.authenticator, limits)
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(flows, server)
        names += (workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,)
    reflection.enable_server_reflection(names, server)
    hint = "" if reuse_port else " (address in use? TASKGATE_REUSE_PORT=1 lets replicas share a port)"
    try:
        if security.credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, security.credentials)
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind ...")
        raise OSError(f"cannot listen on {listen}{hint}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {listen}{hint}")
    return server, port
