"""StreamWorkflow on the process's shared subscription (issue 16): the steps' updates reach
the stream through the hub (no database poll needed to see a chord end), and a stream
costs one inbox of the hub, not a Redis connection."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpc import aio

from service.api.server import build_server
from service.app import Runtime
from service.config import Settings
from service.usecases import workflow_watch
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import workflow_service_pb2 as wpb
from taskgate.v1 import workflow_service_pb2_grpc as wpb_grpc
from tests.helpers import args, value

TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}


def task(name: str, *positional: Any, immutable: bool = False) -> wpb.Step:
    return wpb.Step(task=pb.TaskTemplate(task_name=name, args=args(*positional), immutable=immutable))


def chord(size: int) -> wpb.Step:
    members = [task("demo.add", i, i) for i in range(size)]
    return wpb.Step(chain=wpb.Chain(steps=[wpb.Step(group=wpb.Group(steps=members)), task("demo.sum")]))


@pytest.fixture(scope="module")
async def flows(runtime: Runtime, settings: Settings) -> AsyncIterator[wpb_grpc.WorkflowServiceStub]:
    server, port = build_server(runtime.gateway, runtime.health, settings.listen, workflows=runtime.workflows)
    await server.start()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield wpb_grpc.WorkflowServiceStub(channel)
    await server.stop(1)


async def follow(stub: wpb_grpc.WorkflowServiceStub, workflow_id: str) -> list[wpb.Workflow]:
    seen = []
    async for response in stub.StreamWorkflow(wpb.StreamWorkflowRequest(workflow_id=workflow_id)):
        seen.append(response.workflow)
    return seen


def redis_connections(settings: Settings) -> int:
    """This process's established TCP connections to the Redis server (Linux /proc)."""
    port = int(settings.result_backend.rsplit(":", 1)[1].split("/", 1)[0])
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                established = fields[3] == "01"
                if established and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in sockets:
                    count += 1
    return count


async def test_the_stream_sees_a_chord_end_through_the_hub(
    flows: wpb_grpc.WorkflowServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no fallback poll and no wake-up from this process's workflow loop: only the steps'
    # updates on the shared subscription can move the stream on
    monkeypatch.setattr(workflow_watch, "FALLBACK_POLL", 3600.0)
    monkeypatch.setattr(workflow_watch.Wakeups, "wake", lambda self, workflow_id: None)
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=chord(10)))
    async with asyncio.timeout(60):  # a guard: the poll alone would take an hour
        seen = await follow(flows, response.workflow_id)
    last = seen[-1]
    assert last.state == pb.TASK_STATE_SUCCEEDED
    assert [t.task_id for t in last.tasks] == list(response.task_ids)
    assert all(t.state == pb.TASK_STATE_SUCCEEDED for t in last.tasks)
    assert value(last.tasks[-1].result) == 90
    assert len(seen) >= 2  # the snapshot, then the changes


async def test_twenty_streams_share_the_subscription(
    flows: wpb_grpc.WorkflowServiceStub, runtime: Runtime, settings: Settings
) -> None:
    root = wpb.Step(chain=wpb.Chain(steps=[task("demo.sleep", 2), task("demo.add", 1, 2, immutable=True)]))
    response = await flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
    hub = runtime.hub
    watchers, connections = hub.watcher_count, redis_connections(settings)
    streams = [asyncio.ensure_future(follow(flows, response.workflow_id)) for _ in range(20)]
    try:
        async with asyncio.timeout(30):
            while hub.watcher_count < watchers + 20 and not any(s.done() for s in streams):
                await asyncio.sleep(0.02)
        during = redis_connections(settings)
        print(f"redis connections of this process: {connections} before, {during} with 20 streams")
        assert hub.watcher_count == watchers + 20  # one inbox per stream, whatever its steps
        assert during - connections < 5  # no connection per stream (others may open one)
        async with asyncio.timeout(60):
            results = await asyncio.gather(*streams)
    finally:
        for stream in streams:
            stream.cancel()
    for seen in results:
        assert seen[-1].state == pb.TASK_STATE_SUCCEEDED
        assert value(seen[-1].tasks[-1].result) == 3
    async with asyncio.timeout(10):
        while hub.watcher_count > watchers:  # the server side ends just after the last message
            await asyncio.sleep(0.02)
