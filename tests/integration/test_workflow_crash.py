"""A workflow acknowledged by EnqueueWorkflow survives a gateway SIGKILL right after the
call returns: every step runs exactly once once a gateway is back (its outbox publishes
what the dead one may not have), and the workflow ends SUCCEEDED. A chord with Redis up
(the dead gateway may have published some entry messages), and a chain accepted while
Redis was down (the dead gateway published nothing: the restarted one's relay does).

Executions are counted on the worker's side (``demo.record`` appends one entry per run).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest
from grpc import aio

from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import workflow_service_pb2 as wpb
from taskgate.v1 import workflow_service_pb2_grpc as wpb_grpc
from tests.helpers import args
from tests.integration import test_outbox
from tests.integration.test_outbox import FAST, PrivateRedis, private_worker, runs_by_tag, wait_runs
from tests.processes import gateway_process, start_gateway

private_redis = test_outbox.private_redis
private_settings = test_outbox.private_settings


def _record(tag: str) -> wpb.Step:
    # immutable: a chord's body and a chain's later steps take no previous result
    return wpb.Step(task=pb.TaskTemplate(task_name="demo.record", args=args(tag), immutable=True))


@pytest.mark.parametrize("shape", ["chord", "chain-redis-down"])
async def test_workflow_acknowledged_before_sigkill_runs_once_after_restart(
    shape: str, private_settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    if shape == "chord":
        header = [f"wf-crash-{run}-g{i}" for i in range(5)]
        after = [f"wf-crash-{run}-body", f"wf-crash-{run}-next"]
        group = wpb.Step(group=wpb.Group(steps=[_record(tag) for tag in header]))
        root = wpb.Step(chain=wpb.Chain(steps=[group, *map(_record, after)]))
    else:
        header, after = [], [f"wf-crash-{run}-c{i}" for i in range(4)]
        root = wpb.Step(chain=wpb.Chain(steps=list(map(_record, after))))
    gateway = await start_gateway(private_settings, **FAST)
    if shape == "chain-redis-down":
        private_redis.stop()  # accepted into the database; the outbox cannot publish
    async with aio.insecure_channel(gateway.target) as channel:
        flows = wpb_grpc.WorkflowServiceStub(channel)
        accepted = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    await gateway.stop(signal.SIGKILL)  # right after the acknowledgement
    assert len(accepted.task_ids) == len(header) + len(after)
    if shape == "chain-redis-down":
        private_redis.start()

    with private_worker(private_settings, tmp_path):
        async with gateway_process(private_settings, **FAST) as restarted:
            client = private_redis.client()
            try:
                await wait_runs(client, private_settings, header + after)
                counts = runs_by_tag(client, private_settings)
            finally:
                client.close()
            assert {tag: counts[tag] for tag in header + after} == dict.fromkeys(header + after, 1)
            async with aio.insecure_channel(restarted.target) as channel:
                flows = wpb_grpc.WorkflowServiceStub(channel)
                request = wpb.StreamWorkflowRequest(workflow_id=accepted.workflow_id)
                async with asyncio.timeout(60):
                    async for response in flows.StreamWorkflow(request):
                        workflow = response.workflow
    assert workflow.state == pb.TASK_STATE_SUCCEEDED
    assert [task.task_id for task in workflow.tasks] == list(accepted.task_ids)
    assert all(task.state == pb.TASK_STATE_SUCCEEDED for task in workflow.tasks)
