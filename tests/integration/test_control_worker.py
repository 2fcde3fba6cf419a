"""Time limits and cancel against a real prefork worker (Celery's time limits and terminate
need the prefork pool; the session's worker runs threads), on a queue of its own."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf import duration_pb2

from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT, child_env, stop_process
from tests.helpers import args, wait_state
from tests.security import refused


def start_prefork(settings: Settings, queue: str, log_path: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "prefork", "-c", "1",
        "-Q", queue, "-n", f"{queue}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", "INFO",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, cwd=ROOT, env=child_env(settings), stdout=log, stderr=subprocess.STDOUT
        )


@pytest.fixture(scope="module")
def prefork_queue(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    queue = f"ctl-{uuid.uuid4().hex[:8]}"
    process = start_prefork(settings, queue, tmp_path_factory.mktemp("prefork") / "worker.log")
    yield queue
    stop_process(process)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def test_soft_time_limit_raises_soft_time_limit_exceeded(
    stub: pb_grpc.TaskServiceStub, prefork_queue: str
) -> None:
    request = pb.EnqueueRequest(
        task_name="demo.sleep",
        args=args(30),
        queue=prefork_queue,
        soft_time_limit=seconds(1),
        time_limit=seconds(20),
    )
    task = await wait_state(stub, (await stub.Enqueue(request)).task_id, timeout=60)
    assert task.state == pb.TASK_STATE_FAILED
    assert task.error.type == "SoftTimeLimitExceeded"


async def test_hard_time_limit_ends_failed_with_time_limit_exceeded(
    stub: pb_grpc.TaskServiceStub, prefork_queue: str
) -> None:
    request = pb.EnqueueRequest(
        task_name="demo.sleep", args=args(30), queue=prefork_queue, time_limit=seconds(1)
    )
    task = await wait_state(stub, (await stub.Enqueue(request)).task_id, timeout=60)
    assert task.state == pb.TASK_STATE_FAILED
    assert task.error.type == "TimeLimitExceeded"


@pytest.mark.parametrize(
    "limits",
    [
        {"time_limit": duration_pb2.Duration(seconds=-1)},
        {"soft_time_limit": duration_pb2.Duration(seconds=-1)},
        {"time_limit": duration_pb2.Duration(seconds=1), "soft_time_limit": duration_pb2.Duration(seconds=2)},
    ],
)
async def test_negative_or_inverted_limits_are_invalid(
    stub: pb_grpc.TaskServiceStub, limits: dict[str, duration_pb2.Duration]
) -> None:
    for call in (
        stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), **limits)),
        stub.EnqueueBatch(
            pb.EnqueueBatchRequest(tasks=[pb.BatchTask(task_name="demo.add", args=args(1, 2), **limits)])
        ),
    ):
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_terminate_ends_a_running_task_cancelled(
    stub: pb_grpc.TaskServiceStub, prefork_queue: str
) -> None:
    task_id = (
        await stub.Enqueue(pb.EnqueueRequest(task_name="demo.sleep", args=args(60), queue=prefork_queue))
    ).task_id
    await wait_state(stub, task_id, [pb.TASK_STATE_RUNNING], timeout=60)
    response = await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id, terminate=True, reason="test"))
    assert response.task.cancel_requested
    task = await wait_state(stub, task_id, timeout=30)
    assert task.state == pb.TASK_STATE_CANCELLED


async def test_cancelled_while_no_worker_listens_never_runs(
    stub: pb_grpc.TaskServiceStub, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    queue = f"ctl-down-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex
    request = pb.EnqueueRequest(task_name="demo.record", args=args(tag), queue=queue)
    task_id = (await stub.Enqueue(request)).task_id
    await wait_state(stub, task_id, [pb.TASK_STATE_QUEUED])
    cancelled = (await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    process = start_prefork(settings, queue, tmp_path / "late.log")
    try:
        after = (
            await stub.Enqueue(
                pb.EnqueueRequest(task_name="demo.record", args=args(f"{tag}-after"), queue=queue)
            )
        ).task_id
        await wait_state(stub, after, timeout=60)  # the worker is up and has drained the queue
    finally:
        stop_process(process)
    runs = [
        entry.decode() for entry in redis_client.lrange(f"{settings.key_prefix}taskgate-demo-runs", 0, -1)
    ]
    assert not any(entry.startswith(f"{tag}|") for entry in runs)
    assert (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task.state == pb.TASK_STATE_CANCELLED


async def test_cooperative_cancel_stops_at_the_next_progress_report(
    stub: pb_grpc.TaskServiceStub, prefork_queue: str
) -> None:
    request = pb.EnqueueRequest(task_name="demo.progress", args=args(600, 0.1), queue=prefork_queue)
    task_id = (await stub.Enqueue(request)).task_id
    await wait_state(stub, task_id, [pb.TASK_STATE_RUNNING], timeout=60)
    await stub.CancelTask(pb.CancelTaskRequest(task_id=task_id))
    task = await wait_state(stub, task_id, timeout=30)
    assert task.state == pb.TASK_STATE_CANCELLED
