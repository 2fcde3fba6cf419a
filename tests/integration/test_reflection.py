"""A client that knows only server reflection: `buf curl`, as in the README."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import redis

from service.app import Runtime
from tests.conftest import ROOT

BUF = ROOT / "node_modules" / ".bin" / "buf"


def buf_path() -> Path:
    if BUF.exists():
        return BUF
    found = shutil.which("buf")
    if found:
        return Path(found)
    if os.environ.get("CI"):
        pytest.fail("buf is not installed (npm ci installs @bufbuild/buf)")
    pytest.skip("buf is not installed: run `npm ci`")


async def buf_curl(port: int, method: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Call ``method`` with ``buf curl`` through reflection; return the JSON messages."""
    process = await asyncio.create_subprocess_exec(
        str(buf_path()), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
        "-d", json.dumps(body), f"http://127.0.0.1:{port}/taskgate.v1.TaskService/{method}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    decoder = json.JSONDecoder()
    text, messages, index = out.decode(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        message, index = decoder.raw_decode(text, index)
        messages.append(message)
    return messages


async def test_reflection_client_enqueues_streams_and_reads_after_expiry(
    server_port: int, runtime: Runtime, redis_client: redis.Redis
) -> None:
    (accepted,) = await buf_curl(
        server_port, "Enqueue", {"task_name": "demo.progress", "args": [3], "kwargs": {"interval": 0.1}}
    )
    assert accepted["state"] == "TASK_STATE_QUEUED"
    task_id = accepted["taskId"]
    stream = await buf_curl(server_port, "StreamProgress", {"task_id": task_id})
    assert stream[-1]["task"]["state"] == "TASK_STATE_SUCCEEDED"
    assert stream[-1]["task"]["result"] == 3
    await runtime.recorder.flush()
    # the Redis result expires (result_expires, eviction): the gateway still knows
    redis_client.delete(f"{runtime.settings.task_meta_prefix}{task_id}")
    (status,) = await buf_curl(server_port, "GetStatus", {"task_id": task_id})
    assert status["task"]["state"] == "TASK_STATE_SUCCEEDED"
    assert status["task"]["result"] == 3
    assert status["task"]["progress"]["current"] == 3
