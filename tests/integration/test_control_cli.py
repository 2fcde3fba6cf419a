"""``taskgate cancel | list | wait`` against the real stack (run on a thread: the server
shares the test's event loop)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from service.cli.main import main
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args
from tests.security import held_task


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = await asyncio.to_thread(main, list(argv))
    return code, capsys.readouterr().out


async def test_cancel_list_and_wait(
    stub: pb_grpc.TaskServiceStub, server_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{server_port}"
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    request = held_task()
    request.queue = queue
    held = (await stub.EnqueueAt(request)).task_id
    code, out = await run(capsys, "cancel", held, "--reason", "cli test", "--target", target)
    assert code == 0 and json.loads(out)["state"] == "CANCELLED"
    code, out = await run(capsys, "list", "--filter", f"queue = {queue}", "--target", target)
    assert code == 0 and [json.loads(line)["task_id"] for line in out.splitlines()] == [held]
    done = (await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(2, 2)))).task_id
    code, out = await run(capsys, "wait", done, "--timeout", "30", "--target", target)
    assert code == 0 and json.loads(out)["result"] == 4
    code, _ = await run(capsys, "wait", held, "--target", target)
    assert code == 1  # CANCELLED
    code, _ = await run(capsys, "list", "--filter", "state =", "--target", target)
    assert code == 2
