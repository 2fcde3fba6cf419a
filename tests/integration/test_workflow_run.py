"""WorkflowService against the real stack: chains, chords, failures, cancel, request_id,
validation by path. The session worker is stock Celery (the demo app): it runs what the
gateway sends as it runs Celery's own canvas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

import taskgate
from service.api.server import build_server
from service.app import Runtime
from service.cli.main import main
from service.config import Settings
from taskgate import AsyncClient, TaskState
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import workflow_service_pb2 as wpb
from taskgate.v1 import workflow_service_pb2_grpc as wpb_grpc
from tests.helpers import args, value

TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}


def task(name: str, *positional: Any, immutable: bool = False) -> wpb.Step:
    return wpb.Step(task=pb.TaskTemplate(task_name=name, args=args(*positional), immutable=immutable))


def chain(*steps: wpb.Step) -> wpb.Step:
    return wpb.Step(chain=wpb.Chain(steps=steps))


def group(*steps: wpb.Step) -> wpb.Step:
    return wpb.Step(group=wpb.Group(steps=steps))


@pytest.fixture(scope="module")
async def flows_port(runtime: Runtime, settings: Settings) -> AsyncIterator[int]:
    server, port = build_server(runtime.gateway, runtime.health, settings.listen, workflows=runtime.workflows)
    await server.start()
    yield port
    await server.stop(1)


@pytest.fixture(scope="module")
async def flows(flows_port: int) -> AsyncIterator[wpb_grpc.WorkflowServiceStub]:
    async with aio.insecure_channel(f"127.0.0.1:{flows_port}") as channel:
        yield wpb_grpc.WorkflowServiceStub(channel)


async def finished(stub: wpb_grpc.WorkflowServiceStub, workflow_id: str, timeout: float = 30) -> wpb.Workflow:
    """The workflow once terminal, followed with StreamWorkflow."""
    last = None
    async with asyncio.timeout(timeout):
        async for response in stub.StreamWorkflow(wpb.StreamWorkflowRequest(workflow_id=workflow_id)):
            last = response.workflow
    assert last is not None and last.state in TERMINAL
    return last


async def test_chain_passes_each_result_on(flows: wpb_grpc.WorkflowServiceStub) -> None:
    root = chain(task("demo.add", 1, 2), task("demo.add", 3), task("demo.add", 4))
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    assert len(response.task_ids) == 3 and not response.deduplicated
    first = await flows.GetWorkflow(wpb.GetWorkflowRequest(workflow_id=response.workflow_id))
    assert [t.task_id for t in first.workflow.tasks] == list(response.task_ids)
    assert all(t.workflow_id == response.workflow_id for t in first.workflow.tasks)
    workflow = await finished(flows, response.workflow_id)
    assert workflow.state == pb.TASK_STATE_SUCCEEDED and workflow.HasField("end_time")
    assert [value(t.result) for t in workflow.tasks] == [3, 6, 10]


async def test_group_then_sum_is_a_chord(flows: wpb_grpc.WorkflowServiceStub) -> None:
    root = chain(group(*(task("demo.add", i, i) for i in range(10))), task("demo.sum"))
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    first = await flows.GetWorkflow(wpb.GetWorkflowRequest(workflow_id=response.workflow_id))
    states = [t.state for t in first.workflow.tasks]
    assert states[-1] in (pb.TASK_STATE_WAITING, *TERMINAL, pb.TASK_STATE_RUNNING)
    workflow = await finished(flows, response.workflow_id)
    assert workflow.state == pb.TASK_STATE_SUCCEEDED
    assert value(workflow.tasks[-1].result) == 90


async def test_chain_of_groups(flows: wpb_grpc.WorkflowServiceStub) -> None:
    root = chain(
        task("demo.add", 1, 1),
        group(task("demo.add", 10), task("demo.add", 20)),
        task("demo.sum"),
        group(task("demo.add", 1), task("demo.add", 2)),
        task("demo.sum"),
    )
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    workflow = await finished(flows, response.workflow_id)
    assert workflow.state == pb.TASK_STATE_SUCCEEDED, workflow
    # 2 → [12, 22] → 34 → [35, 36] → 71
    assert [value(t.result) for t in workflow.tasks] == [2, 12, 22, 34, 35, 36, 71]


async def test_a_group_of_chains(flows: wpb_grpc.WorkflowServiceStub) -> None:
    root = group(
        chain(task("demo.add", 1, 2), task("demo.add", 3)), chain(task("demo.add", 5, 5), task("demo.add", 1))
    )
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    workflow = await finished(flows, response.workflow_id)
    assert [value(t.result) for t in workflow.tasks] == [3, 6, 10, 11]


async def test_a_failed_step_cancels_the_rest(flows: wpb_grpc.WorkflowServiceStub) -> None:
    root = chain(
        task("demo.add", 1, 2),
        task("demo.fail", "boom", immutable=True),
        task("demo.add", 1),
        task("demo.add", 2),
    )
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    workflow = await finished(flows, response.workflow_id)
    assert workflow.state == pb.TASK_STATE_FAILED
    want = [pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED, pb.TASK_STATE_CANCELLED]
    # Celery marks the rest of the chain FAILED (_fail_chain) in the same breath as the failed
    # step; the workflow loop turns them CANCELLED (every 0.5 s): seen once in CI still FAILED
    # right after the workflow read terminal, so give the loop a few rounds
    for _ in range(50):
        if [t.state for t in workflow.tasks] == want:
            break
        await asyncio.sleep(0.1)
        request = wpb.GetWorkflowRequest(workflow_id=response.workflow_id)
        workflow = (await flows.GetWorkflow(request)).workflow
    assert [t.state for t in workflow.tasks] == want
    failed = response.task_ids[1]
    for later in workflow.tasks[2:]:
        assert "root.chain.steps[1]" in later.error.message and failed in later.error.message


async def test_cancel_mid_chain(flows: wpb_grpc.WorkflowServiceStub) -> None:
    root = chain(
        task("demo.sleep", 0.5),
        task("demo.sleep", 30, immutable=True),
        task("demo.add", 1, 2, immutable=True),
    )
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    for _ in range(100):  # until the second step runs
        current = await flows.GetWorkflow(wpb.GetWorkflowRequest(workflow_id=response.workflow_id))
        if current.workflow.tasks[1].state == pb.TASK_STATE_RUNNING:
            break
        await asyncio.sleep(0.1)
    cancelled = await flows.CancelWorkflow(
        wpb.CancelWorkflowRequest(workflow_id=response.workflow_id, terminate=True, reason="test")
    )
    assert cancelled.workflow.tasks[2].state == pb.TASK_STATE_CANCELLED
    workflow = await finished(flows, response.workflow_id, timeout=60)
    assert workflow.state in (pb.TASK_STATE_CANCELLED, pb.TASK_STATE_FAILED)
    assert workflow.tasks[0].state == pb.TASK_STATE_SUCCEEDED
    assert all(t.state in TERMINAL for t in workflow.tasks)


async def test_request_id_repeats_the_workflow(flows: wpb_grpc.WorkflowServiceStub) -> None:
    request_id = f"wf-{uuid.uuid4()}"
    root = chain(task("demo.add", 1, 2), task("demo.add", 3))
    first = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root, request_id=request_id))
    again = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root, request_id=request_id))
    assert again.deduplicated and again.workflow_id == first.workflow_id
    assert again.task_ids == first.task_ids
    other = chain(task("demo.add", 1, 2), task("demo.add", 4))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=other, request_id=request_id))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await finished(flows, first.workflow_id)


@pytest.mark.parametrize(
    ("root", "path"),
    [
        (chain(task("demo.add", 1, 2), group(task("demo.nope"))), "root.chain.steps[1].group.steps[0]"),
        (chain(task("demo.add", 1, 2), task("demo.add", 1, 2)), "root.chain.steps[1]"),
        (chain(task("demo.add", 1), group()), "root.chain.steps[1].group.steps is empty"),
        (wpb.Step(), "root: a step needs one of task, chain or group"),
        (chain(task("demo.add", 1, 2), task("")), "root.chain.steps[1].task.task_name is required"),
    ],
)
async def test_validation_errors_name_the_step(
    flows: wpb_grpc.WorkflowServiceStub, root: wpb.Step, path: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert path in (caught.value.details() or "")


async def test_immutable_step_takes_no_result(flows: wpb_grpc.WorkflowServiceStub) -> None:
    root = chain(task("demo.add", 1, 2), task("demo.add", 5, 5, immutable=True))
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    workflow = await finished(flows, response.workflow_id)
    assert value(workflow.tasks[1].result) == 10


async def test_unknown_workflow_is_not_found(flows: wpb_grpc.WorkflowServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await flows.GetWorkflow(wpb.GetWorkflowRequest(workflow_id=str(uuid.uuid4())))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_python_client_chord(flows_port: int) -> None:
    async with AsyncClient(f"127.0.0.1:{flows_port}") as client:
        root = taskgate.chain(
            taskgate.group(*(taskgate.sig("demo.add", i, i) for i in range(10))), taskgate.sig("demo.sum")
        )
        workflow_id, task_ids = await client.enqueue_workflow(root)
        assert len(task_ids) == 11
        workflow = await client.wait_workflow(workflow_id)
    assert workflow.state is TaskState.SUCCEEDED
    assert workflow.tasks[-1].result == 90
    assert [task.task_id for task in workflow.tasks] == task_ids


async def test_cli_shows_the_steps(flows_port: int, flows: wpb_grpc.WorkflowServiceStub, capsys: Any) -> None:
    root = chain(task("demo.add", 1, 2), task("demo.add", 3))
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    argv = ["workflow", response.workflow_id, "--target", f"127.0.0.1:{flows_port}"]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    assert f"workflow {response.workflow_id}: SUCCEEDED" in out
    assert all(task_id in out for task_id in response.task_ids)
