"""Workflow cost: a group of 500 through EnqueueWorkflow against EnqueueBatch of 500, per task.

One gateway runtime runs in this process on the section's private database and Redis (no
workers: the messages pile up and are dropped), served on a free port; one client on the
same event loop sends, one call at a time, ``ROUNDS`` EnqueueBatch calls of ``SIZE`` tasks,
``ROUNDS`` EnqueueWorkflow calls of a group of ``SIZE`` tasks, and ``ROUNDS`` of a chord
(the group followed by ``demo.sum``), after one warm-up call of each. Reported: the median
call's wall time and its cost per task. The target: the group costs at most 2x per task
what the batch does.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from google.protobuf import struct_pb2
from grpc import aio

from bench.infra import Children, PrivateDatabase, PrivateRedis, announce
from bench.plan import Plan
from service.api.server import build_server
from service.app import Runtime
from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.v1 import workflow_service_pb2 as wpb
from taskgate.v1 import workflow_service_pb2_grpc as wpb_grpc

SIZE = 500
ROUNDS = 10


def _args(*values: float) -> struct_pb2.ListValue:
    message = struct_pb2.ListValue()
    message.extend(values)
    return message


def _group() -> wpb.Step:
    members = [wpb.Step(task=pb.TaskTemplate(task_name="demo.add", args=_args(i, i))) for i in range(SIZE)]
    return wpb.Step(group=wpb.Group(steps=members))


def _chord() -> wpb.Step:
    body = wpb.Step(task=pb.TaskTemplate(task_name="demo.sum"))
    return wpb.Step(chain=wpb.Chain(steps=[_group(), body]))


async def _median(call: Callable[[], Awaitable[object]]) -> float:
    await call()  # warm-up
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _measure(settings: Settings) -> dict[str, float]:
    runtime = await Runtime.start(settings)
    server, port = build_server(runtime.gateway, runtime.health, "127.0.0.1:0", workflows=runtime.workflows)
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            tasks = pb_grpc.TaskServiceStub(channel)
            flows = wpb_grpc.WorkflowServiceStub(channel)
            batch = pb.EnqueueBatchRequest(
                tasks=[pb.BatchTask(task_name="demo.add", args=_args(i, i)) for i in range(SIZE)]
            )
            group = wpb.EnqueueWorkflowRequest(root=_group())
            chord = wpb.EnqueueWorkflowRequest(root=_chord())
            return {
                "EnqueueBatch": await _median(lambda: tasks.EnqueueBatch(batch)),
                "EnqueueWorkflow group": await _median(lambda: flows.EnqueueWorkflow(group)),
                "EnqueueWorkflow chord": await _median(lambda: flows.EnqueueWorkflow(chord)),
            }
    finally:
        await server.stop(1)
        runtime.hub.begin_shutdown()
        await runtime.stop()


def run_workflows(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Section: a group (and a chord) of 500 via EnqueueWorkflow against EnqueueBatch of 500."""
    announce(f"workflows: {ROUNDS} calls each of {SIZE} tasks")
    settings = Settings(
        database_url=db.url,
        broker_url=redis.url,
        result_backend=redis.url,
        listen="127.0.0.1:0",
        state_feed=False,
        tasks="demo.add,demo.sum",
    )
    medians = asyncio.run(_measure(settings))
    batch = medians["EnqueueBatch"]
    group = medians["EnqueueWorkflow group"]
    verdict = "MET" if group <= 2 * batch else "NOT MET"
    rows = [
        f"| {name} | {seconds * 1000:.1f} | {seconds / SIZE * 1e6:.0f} | {seconds / batch:.2f}x |"
        for name, seconds in medians.items()
    ]
    return "\n".join(
        [
            f"## Workflows — {SIZE} tasks per call, median of {ROUNDS} calls (client on the same loop)",
            "",
            "| call | median (ms) | per task (µs) | against EnqueueBatch |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"group / batch per task: {group / batch:.2f}x. Target ≤ 2x: {verdict}.",
        ]
    )
