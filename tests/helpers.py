"""Small helpers the integration tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format, struct_pb2

from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

TERMINAL = (pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED)


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
