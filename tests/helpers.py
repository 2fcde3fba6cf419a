"""Small helpers the integration tests share."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2

from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

TERMINAL = (pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED)
ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def worker_group(
    env: dict[str, str], log_path: Path, *options: str, graceful: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """A demo Celery worker (thread pool; ``options`` add to or override nothing else) in a
    process group of its own, logging to ``log_path``; SIGKILLed at the end, or SIGTERM with
    15 s to finish when ``graceful``."""
    command = [
        sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "threads", *options,
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                process.wait(15 if graceful else None)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def args(*values: Any) -> struct_pb2.ListValue:
    """A ListValue of ``values``."""
    return json_format.ParseDict(list(values), struct_pb2.ListValue())


def kwargs(**values: Any) -> struct_pb2.Struct:
    """A Struct of ``values``."""
    return json_format.ParseDict(values, struct_pb2.Struct())


def value(message: struct_pb2.Value) -> Any:
    """A protobuf Value as Python."""
    return json_format.MessageToDict(message)


async def wait_state(
    stub: pb_grpc.TaskServiceStub,
    task_id: str,
    states: Iterable[pb.TaskState.ValueType] = TERMINAL,
    timeout: float = 30,
) -> pb.Task:
    """Poll GetStatus until the task is in one of ``states``; fail after ``timeout`` seconds."""
    wanted = set(states)
    deadline = time.monotonic() + timeout
    while True:
        task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
        if task.state in wanted:
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {pb.TaskState.Name(task.state)} after {timeout}s")
        await asyncio.sleep(0.1)


async def enqueue(stub: pb_grpc.TaskServiceStub, task_name: str, *positional: Any, **named: Any) -> str:
    """Enqueue ``task_name`` with arguments; return its task id."""
    request = pb.EnqueueRequest(task_name=task_name, args=args(*positional), kwargs=kwargs(**named))
    return (await stub.Enqueue(request)).task_id


async def fired(stub: pb_grpc.TaskServiceStub, schedule_id: str) -> list[pb.Task]:
    """Every task the schedule fired, oldest first."""
    query = pb.ListTasksRequest(
        filter=f'schedule_id = "{schedule_id}"', order_by="create_time asc", page_size=1000
    )
    return list((await stub.ListTasks(query)).tasks)


def slot_ms(task: pb.Task) -> int:
    """The slot of a firing, from its request_id (``schedule:<id>:<created>:<slot ms>``)."""
    return int(task.request_id.rsplit(":", 1)[1])
