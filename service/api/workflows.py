"""The WorkflowService servicer: identify the caller, apply limits, decode, call the use
case, encode."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from service.api import control_convert
from service.api import workflow_convert as wc
from service.api.auth import Authenticator
from service.api.limits import RateLimiter, ServiceLimits, StreamSlots
from service.api.status import grpc_errors
from service.usecases.workflows import Workflows
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import workflow_service_pb2 as wpb
from taskgate.v1 import workflow_service_pb2_grpc as wpb_grpc

Context = aio.ServicerContext[Any, Any]

#: One line per EnqueueWorkflow / CancelWorkflow: who, which workflow, the outcome.
audit = logging.getLogger("taskgate.audit")


class WorkflowServicer(wpb_grpc.WorkflowServiceServicer):
    """Implements taskgate.v1.WorkflowService on top of the Workflows use cases."""

    def __init__(
        self,
        workflows: Workflows,
        authenticator: Authenticator | None = None,
        limits: ServiceLimits | None = None,
    ) -> None:
        self._workflows = workflows
        self._auth = authenticator or Authenticator.open()
        self._limits = limits or ServiceLimits()
        self._rate = RateLimiter()
        self._streams = StreamSlots(self._limits.max_streams_per_caller, self._limits.max_streams)

    @grpc_errors
    async def EnqueueWorkflow(  # noqa: N802
        self, request: wpb.EnqueueWorkflowRequest, context: Context
    ) -> wpb.EnqueueWorkflowResponse:
        caller = self._auth.caller_of(context)
        request_id = wc.request_id_of(request)
        root = wc.workflow_of(request, self._limits.input, self._limits.max_batch)
        self._rate.check(caller)
        enqueued = await self._workflows.enqueue(root, caller, request_id=request_id)
        outcome = "deduplicated" if enqueued.deduplicated else "accepted"
        audit.info(
            "caller=%r workflow_id=%s of %d tasks request_id=%r outcome=%s",
            caller.name,
            enqueued.workflow_id,
            len(enqueued.task_ids),
            request_id,
            outcome,
        )
        return wpb.EnqueueWorkflowResponse(
            workflow_id=enqueued.workflow_id, task_ids=enqueued.task_ids, deduplicated=enqueued.deduplicated
        )

    @grpc_errors
    async def GetWorkflow(self, request: wpb.GetWorkflowRequest, context: Context) -> wpb.GetWorkflowResponse:  # noqa: N802
        caller = self._auth.caller_of(context)
        view = await self._workflows.get(wc.workflow_id_of(request.workflow_id), caller)
        return wpb.GetWorkflowResponse(workflow=wc.workflow_to_proto(view))

    @grpc_errors
    async def StreamWorkflow(  # noqa: N802
        self, request: wpb.StreamWorkflowRequest, context: Context
    ) -> AsyncIterator[wpb.StreamWorkflowResponse]:
        caller = self._auth.caller_of(context)
        workflow_id = wc.workflow_id_of(request.workflow_id)
        with self._streams.hold(caller):
            watch = self._workflows.watch(workflow_id, caller, lifetime=self._limits.stream_lifetime)
            async with contextlib.aclosing(watch) as views:
                async for view in views:
                    yield wpb.StreamWorkflowResponse(workflow=wc.workflow_to_proto(view))

    @grpc_errors
    async def CancelWorkflow(  # noqa: N802
        self, request: wpb.CancelWorkflowRequest, context: Context
    ) -> wpb.CancelWorkflowResponse:
        caller = self._auth.caller_of(context)
        workflow_id = wc.workflow_id_of(request.workflow_id)
        reason = control_convert.reason_of(pb.CancelTaskRequest(reason=request.reason))
        view = await self._workflows.cancel(workflow_id, caller, terminate=request.terminate, reason=reason)
        audit.info(
            "caller=%r cancel workflow_id=%s terminate=%s reason=%r outcome=%s",
            caller.name,
            workflow_id,
            request.terminate,
            reason,
            view.state.value,
        )
        return wpb.CancelWorkflowResponse(workflow=wc.workflow_to_proto(view))
