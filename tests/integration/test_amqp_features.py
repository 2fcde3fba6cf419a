"""Cancel, schedules, workflows, ListQueues and ListWorkers on Redis and on RabbitMQ.

The tests of a broker share one gateway process (and its database and key prefix); each
starts the real Celery worker (``tests.amqp_worker``) it needs on that broker, and uses tags,
queues and worker names of its own. The result backend is Redis either way. The Redis-only
variants of these cases (and their corner cases) are in ``test_control_cancel.py``,
``test_control_worker.py``, ``test_schedules_firing.py``, ``test_workflow_run.py`` and
``test_operations_fleet.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from service.config import Settings
from taskgate.v1 import operations_service_pb2 as ops
from taskgate.v1 import operations_service_pb2_grpc as ops_grpc
from taskgate.v1 import schedule_service_pb2 as spb
from taskgate.v1 import schedule_service_pb2_grpc as spb_grpc
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from taskgate.v1 import workflow_service_pb2 as wpb
from taskgate.v1 import workflow_service_pb2_grpc as wpb_grpc
from tests import amqp_fixtures
from tests.amqp_fixtures import FAST, broker_worker, runs_by_tag, wait_runs
from tests.helpers import args, fired, slot_ms, value, wait_state
from tests.processes import GatewayProcess, gateway_process

# the fixtures this module uses (Redis and RabbitMQ)
amqp_vhost = amqp_fixtures.amqp_vhost
broker_settings = amqp_fixtures.module_broker_settings

TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}
#: Schedules looked at five times a second.
POLL = {"TASKGATE_SCHEDULE_POLL_INTERVAL": "0.2"}


def worker(settings: Settings, tmp_path: Path, **options: Any) -> contextlib.AbstractContextManager[Path]:
    """``broker_worker``, killed 3 s after SIGTERM: each test is done with its worker when
    it stops it (a threads-pool worker on RabbitMQ takes about 10 s to stop by itself)."""
    return broker_worker(settings, tmp_path, stop_timeout=3, **options)


@dataclass
class Stubs:
    """The gateway's services on one channel."""

    tasks: pb_grpc.TaskServiceStub
    ops: ops_grpc.OperationsServiceStub
    flows: wpb_grpc.WorkflowServiceStub
    schedules: spb_grpc.ScheduleServiceStub


@pytest.fixture(scope="module")
async def gateway(broker_settings: Settings) -> AsyncIterator[GatewayProcess]:
    async with gateway_process(broker_settings, **POLL, **FAST) as process:
        yield process


@pytest.fixture(scope="module")
async def stubs(gateway: GatewayProcess) -> AsyncIterator[Stubs]:
    async with aio.insecure_channel(gateway.target) as channel:
        yield Stubs(
            pb_grpc.TaskServiceStub(channel),
            ops_grpc.OperationsServiceStub(channel),
            wpb_grpc.WorkflowServiceStub(channel),
            spb_grpc.ScheduleServiceStub(channel),
        )


async def broker_messages(stubs: Stubs, queue: str, count: int, timeout: float = 30) -> ops.QueueInfo:
    """ListQueues' entry for ``queue`` once it shows ``count`` messages in the broker."""
    deadline = time.monotonic() + timeout
    while True:
        queues = {q.name: q for q in (await stubs.ops.ListQueues(ops.ListQueuesRequest())).queues}
        info = queues.get(queue)
        if info is not None and info.broker_messages == count:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"queue {queue}: {info} after {timeout}s, expected {count} messages")
        await asyncio.sleep(0.2)


# --- CancelTask: the durable mark, and Celery's revoke over the broker


async def test_a_cancelled_queued_task_never_runs(
    broker_settings: Settings, stubs: Stubs, tmp_path: Path
) -> None:
    tag = f"cancelled-{uuid.uuid4().hex[:6]}"
    queue = f"cancel-{tag}"
    request = pb.EnqueueRequest(task_name="demo.record", args=args(tag), queue=queue)
    task_id = (await stubs.tasks.Enqueue(request)).task_id
    await broker_messages(stubs, queue, 1)  # in the broker, no worker yet
    cancelled = (await stubs.tasks.CancelTask(pb.CancelTaskRequest(task_id=task_id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED and cancelled.cancel_requested
    with worker(broker_settings, tmp_path, queues=queue):
        after = pb.EnqueueRequest(task_name="demo.record", args=args(f"{tag}-after"), queue=queue)
        await stubs.tasks.Enqueue(after)
        await wait_runs(broker_settings, [f"{tag}-after"], timeout=60)  # the queue is drained
    assert tag not in runs_by_tag(broker_settings)
    task = (await stubs.tasks.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
    assert task.state == pb.TASK_STATE_CANCELLED


async def test_a_running_task_stops_at_its_next_progress_report(
    broker_settings: Settings, stubs: Stubs, tmp_path: Path
) -> None:
    with worker(broker_settings, tmp_path, concurrency=2):
        request = pb.EnqueueRequest(task_name="demo.progress", args=args(600, 0.1))
        task_id = (await stubs.tasks.Enqueue(request)).task_id
        await wait_state(stubs.tasks, task_id, [pb.TASK_STATE_RUNNING], timeout=60)
        await stubs.tasks.CancelTask(pb.CancelTaskRequest(task_id=task_id))
        task = await wait_state(stubs.tasks, task_id, timeout=30)
    assert task.state == pb.TASK_STATE_CANCELLED


async def test_terminate_ends_a_running_task_by_revoke(
    broker_settings: Settings, stubs: Stubs, tmp_path: Path
) -> None:
    """``demo.sleep`` never looks at the mark: only the broadcast revoke (``terminate``,
    which needs the prefork pool) can end it."""
    queue = f"terminate-{uuid.uuid4().hex[:6]}"
    with worker(broker_settings, tmp_path, concurrency=1, pool="prefork", queues=queue):
        request = pb.EnqueueRequest(task_name="demo.sleep", args=args(60), queue=queue)
        task_id = (await stubs.tasks.Enqueue(request)).task_id
        await wait_state(stubs.tasks, task_id, [pb.TASK_STATE_RUNNING], timeout=60)
        cancel = pb.CancelTaskRequest(task_id=task_id, terminate=True, reason="test")
        assert (await stubs.tasks.CancelTask(cancel)).task.cancel_requested
        task = await wait_state(stubs.tasks, task_id, timeout=30)
    assert task.state == pb.TASK_STATE_CANCELLED


# --- schedules


async def test_a_schedule_fires_each_slot_once_and_the_tasks_run(
    broker_settings: Settings, stubs: Stubs, tmp_path: Path
) -> None:
    schedule_id = f"every-{uuid.uuid4().hex[:8]}"
    schedule = spb.Schedule(
        schedule_id=schedule_id, task=pb.TaskTemplate(task_name="demo.add", args=args(1, 2))
    )
    schedule.interval.FromTimedelta(dt.timedelta(seconds=1))
    schedule.overlap_policy = spb.OVERLAP_POLICY_ALLOW
    with worker(broker_settings, tmp_path):
        await stubs.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=schedule))
        async with asyncio.timeout(30):
            while len(await fired(stubs.tasks, schedule_id)) < 4:
                await asyncio.sleep(0.2)
        await stubs.schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))
        tasks = await fired(stubs.tasks, schedule_id)
        finished = [await wait_state(stubs.tasks, task.task_id, timeout=30) for task in tasks]
    slots = [slot_ms(task) for task in tasks]
    assert len(set(slots)) == len(slots), "a slot fired twice"
    assert all(later - earlier == 1000 for earlier, later in itertools.pairwise(slots)), slots
    # the delete withdraws the one slot the gateway may have decided ahead (it ends CANCELLED)
    if finished[-1].state == pb.TASK_STATE_CANCELLED:
        finished.pop()
    assert len(finished) >= 3
    assert all(t.state == pb.TASK_STATE_SUCCEEDED and value(t.result) == 3 for t in finished)


# --- workflows


def step(name: str, *positional: Any) -> wpb.Step:
    return wpb.Step(task=pb.TaskTemplate(task_name=name, args=args(*positional)))


def chain(*steps: wpb.Step) -> wpb.Step:
    return wpb.Step(chain=wpb.Chain(steps=steps))


def group(*steps: wpb.Step) -> wpb.Step:
    return wpb.Step(group=wpb.Group(steps=steps))


async def finished_workflow(flows: wpb_grpc.WorkflowServiceStub, workflow_id: str) -> wpb.Workflow:
    """The workflow once terminal, followed with StreamWorkflow."""
    last = None
    async with asyncio.timeout(30):
        async for response in flows.StreamWorkflow(wpb.StreamWorkflowRequest(workflow_id=workflow_id)):
            last = response.workflow
    assert last is not None and last.state in TERMINAL
    return last


async def test_a_chain_a_group_and_a_chord_succeed(
    broker_settings: Settings, stubs: Stubs, tmp_path: Path
) -> None:
    roots = {
        "chain": chain(step("demo.add", 1, 2), step("demo.add", 3), step("demo.add", 4)),
        "group": group(*(step("demo.add", i, i) for i in range(5))),
        "chord": chain(group(*(step("demo.add", i, i) for i in range(10))), step("demo.sum")),
    }
    with worker(broker_settings, tmp_path):
        started = {
            kind: await stubs.flows.EnqueueWorkflow(wpb.EnqueueWorkflowRequest(root=root))
            for kind, root in roots.items()
        }
        done = {kind: await finished_workflow(stubs.flows, r.workflow_id) for kind, r in started.items()}
    assert {kind: w.state for kind, w in done.items()} == dict.fromkeys(roots, pb.TASK_STATE_SUCCEEDED)
    assert [value(t.result) for t in done["chain"].tasks] == [3, 6, 10]
    assert [value(t.result) for t in done["group"].tasks] == [0, 2, 4, 6, 8]
    assert value(done["chord"].tasks[-1].result) == 90


# --- ListQueues and ListWorkers


async def test_list_queues_shows_a_backlog_and_list_workers_the_worker(
    broker_settings: Settings, stubs: Stubs, tmp_path: Path
) -> None:
    queue = f"backlog-{uuid.uuid4().hex[:6]}"  # no worker consumes it
    name = f"fleet-{uuid.uuid4().hex[:6]}"
    with worker(broker_settings, tmp_path, name=name):
        for _ in range(5):
            await stubs.tasks.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue=queue))
        info = await broker_messages(stubs, queue, 5)
        assert info.queued == 5
        # the worker may still be starting, and a busy one may miss one of the three
        # broadcasts' one-second window (it is then listed without its pool size)
        async with asyncio.timeout(30):
            while True:
                workers = (await stubs.ops.ListWorkers(ops.ListWorkersRequest())).workers
                mine = [w for w in workers if w.hostname.startswith(f"{name}@")]
                if mine and mine[0].concurrency and mine[0].queues:
                    break
                await asyncio.sleep(0.5)
    assert mine[0].queues == ["celery"]
    assert mine[0].concurrency == 16
