"""Workflows for the clients: ``chain()``, ``group()`` and ``sig()`` to describe one, the
``Workflow`` the gateway reports, and the methods ``AsyncClient`` and ``Client`` get from
the two mixins here.

::

    from taskgate import chain, group, sig

    workflow_id, task_ids = client.enqueue_workflow(
        chain(group(*(sig("demo.add", i, i) for i in range(10))), sig("demo.sum"))
    )
    assert client.wait_workflow(workflow_id).tasks[-1].result == 90

As in Celery, a chain passes each step's result to the next step as its first argument
(``sig(..., immutable=True)`` refuses it), a group's result is the list of its steps'
results, and a group followed by a step in a chain is a chord.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from taskgate import _convert
from taskgate._convert import Task, TaskState
from taskgate.errors import rpc_errors as _rpc_errors
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import workflow_service_pb2 as wpb
from taskgate.v1 import workflow_service_pb2_grpc as wpb_grpc


@dataclass(frozen=True, slots=True)
class Sig:
    """One task step: ``task_name(*args, **kwargs)`` and its options (keyword-only)."""

    task_name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str = ""
    priority: int | None = None
    #: True: a chain does not prepend the previous step's result to its args
    immutable: bool = False

    def set(self, **options: Any) -> Sig:
        """This step with ``options`` (queue, priority, immutable) changed."""
        return dataclasses.replace(self, **options)


@dataclass(frozen=True, slots=True)
class Chain:
    """Steps run in order, each given the previous one's result."""

    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Group:
    """Steps run in parallel; the result is the list of theirs."""

    steps: tuple[Step, ...]


Step = Sig | Chain | Group


def sig(task_name: str, /, *args: Any, **kwargs: Any) -> Sig:
    """A task step (options with ``.set(queue=…, priority=…, immutable=True)``)."""
    return Sig(task_name, args, kwargs)


def chain(*steps: Step) -> Chain:
    """A chain of steps."""
    return Chain(steps)


def group(*steps: Step) -> Group:
    """A group of steps."""
    return Group(steps)


@dataclass(frozen=True, slots=True)
class Workflow:
    """A workflow as the gateway reports it: its state and every task step, depth first."""

    workflow_id: str
    state: TaskState
    tasks: list[Task]
    create_time: dt.datetime | None = None
    end_time: dt.datetime | None = None


def step_message(step: Step) -> wpb.Step:
    """A step as the proto Step."""
    if isinstance(step, Sig):
        template = pb.TaskTemplate(
            task_name=step.task_name,
            args=_convert.to_list_value(step.args),
            kwargs=_convert.to_struct(step.kwargs),
            queue=step.queue,
            immutable=step.immutable,
        )
        if step.priority is not None:
            template.priority = step.priority
        return wpb.Step(task=template)
    children = [step_message(child) for child in step.steps]
    if isinstance(step, Chain):
        return wpb.Step(chain=wpb.Chain(steps=children))
    return wpb.Step(group=wpb.Group(steps=children))


def workflow_from_proto(message: wpb.Workflow) -> Workflow:
    """The proto Workflow as a ``Workflow``."""
    return Workflow(
        workflow_id=message.workflow_id,
        state=_convert.state_from_proto(message.state),
        tasks=[_convert.task_from_proto(task) for task in message.tasks],
        create_time=message.create_time.ToDatetime(tzinfo=dt.UTC)
        if message.HasField("create_time")
        else None,
        end_time=message.end_time.ToDatetime(tzinfo=dt.UTC) if message.HasField("end_time") else None,
    )


class AsyncWorkflows:
    """WorkflowService methods of ``AsyncClient``."""

    _channel: aio.Channel
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    @property
    def _workflows(self) -> wpb_grpc.WorkflowServiceAsyncStub:
        return wpb_grpc.WorkflowServiceStub(self._channel)

    async def enqueue_workflow(self, root: Step, *, request_id: str = "") -> tuple[str, list[str]]:
        """Enqueue a workflow; returns its id and every task step's id, depth first."""
        request = wpb.EnqueueWorkflowRequest(root=step_message(root), request_id=request_id)
        with _rpc_errors():
            response = await self._workflows.EnqueueWorkflow(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.workflow_id, list(response.task_ids)

    async def get_workflow(self, workflow_id: str) -> Workflow:
        """The workflow as it is now."""
        request = wpb.GetWorkflowRequest(workflow_id=workflow_id)
        with _rpc_errors():
            response = await self._workflows.GetWorkflow(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return workflow_from_proto(response.workflow)

    async def watch_workflow(self, workflow_id: str) -> AsyncGenerator[Workflow, None]:
        """The workflow's snapshot, then one per change, until it is terminal."""
        request = wpb.StreamWorkflowRequest(workflow_id=workflow_id)
        with _rpc_errors():
            async for response in self._workflows.StreamWorkflow(request, metadata=self._metadata):
                yield workflow_from_proto(response.workflow)

    async def wait_workflow(self, workflow_id: str) -> Workflow:
        """The workflow once terminal."""
        last = None
        async for workflow in self.watch_workflow(workflow_id):
            last = workflow
        assert last is not None  # a stream sends its snapshot first
        return last

    async def cancel_workflow(
        self, workflow_id: str, *, terminate: bool = False, reason: str = ""
    ) -> Workflow:
        """Cancel every unfinished step; returns the workflow after it."""
        request = wpb.CancelWorkflowRequest(workflow_id=workflow_id, terminate=terminate, reason=reason)
        with _rpc_errors():
            response = await self._workflows.CancelWorkflow(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return workflow_from_proto(response.workflow)


class Workflows:
    """WorkflowService methods of ``Client`` (blocking)."""

    _channel: grpc.Channel
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    @property
    def _workflows(self) -> wpb_grpc.WorkflowServiceStub:
        return wpb_grpc.WorkflowServiceStub(self._channel)

    def enqueue_workflow(self, root: Step, *, request_id: str = "") -> tuple[str, list[str]]:
        """Enqueue a workflow; returns its id and every task step's id, depth first."""
        request = wpb.EnqueueWorkflowRequest(root=step_message(root), request_id=request_id)
        with _rpc_errors():
            response = self._workflows.EnqueueWorkflow(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.workflow_id, list(response.task_ids)

    def get_workflow(self, workflow_id: str) -> Workflow:
        """The workflow as it is now."""
        request = wpb.GetWorkflowRequest(workflow_id=workflow_id)
        with _rpc_errors():
            response = self._workflows.GetWorkflow(request, timeout=self._timeout, metadata=self._metadata)
        return workflow_from_proto(response.workflow)

    def watch_workflow(self, workflow_id: str) -> Generator[Workflow, None, None]:
        """The workflow's snapshot, then one per change, until it is terminal."""
        request = wpb.StreamWorkflowRequest(workflow_id=workflow_id)
        with _rpc_errors():
            for response in self._workflows.StreamWorkflow(request, metadata=self._metadata):
                yield workflow_from_proto(response.workflow)

    def wait_workflow(self, workflow_id: str) -> Workflow:
        """The workflow once terminal."""
        last = None
        for workflow in self.watch_workflow(workflow_id):
            last = workflow
        assert last is not None  # a stream sends its snapshot first
        return last

    def cancel_workflow(self, workflow_id: str, *, terminate: bool = False, reason: str = "") -> Workflow:
        """Cancel every unfinished step; returns the workflow after it."""
        request = wpb.CancelWorkflowRequest(workflow_id=workflow_id, terminate=terminate, reason=reason)
        with _rpc_errors():
            response = self._workflows.CancelWorkflow(request, timeout=self._timeout, metadata=self._metadata)
        return workflow_from_proto(response.workflow)
