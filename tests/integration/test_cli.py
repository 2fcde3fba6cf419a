"""The people-facing CLI: taskgate enqueue / status / watch, with meaningful exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.conftest import ROOT


async def run_cli(
    *arguments: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``python -m service *arguments`` with pipes for stdin, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *arguments, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), 90)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def taskgate(port: int, *arguments: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """The CLI against the test gateway, ``--target`` after the command's arguments."""
    return await run_cli(*arguments, "--target", f"127.0.0.1:{port}", stdin=stdin)


async def test_enqueue_wait_shows_progress_and_the_result(server_port: int) -> None:
    code, out, _ = await taskgate(
        server_port, "enqueue", "demo.progress", "3", "--kwargs", '{"interval": 0.1}', "--wait"
    )
    assert code == 0
    assert "3/3" in out and "step 3 of 3" in out
    assert "SUCCEEDED result: 3" in out


async def test_watch_and_status_of_an_enqueued_task(server_port: int) -> None:
    code, out, _ = await taskgate(
        server_port, "enqueue", "demo.progress", "2", "--kwargs", '{"interval": 0.2}'
    )
    assert code == 0
    task_id = out.strip()
    code, out, _ = await taskgate(server_port, "watch", task_id)
    assert code == 0
    assert "SUCCEEDED" in out
    code, out, _ = await taskgate(server_port, "status", task_id)
    assert code == 0
    assert json.loads(out)["result"] == 2


async def test_exit_codes_tell_failure_from_refusal(server_port: int) -> None:
    code, out, _ = await taskgate(server_port, "enqueue", "demo.fail", "boom", "--wait")
    assert code == 1
    assert "DemoError: boom" in out
    code, _, err = await taskgate(server_port, "status", "no-such-task")
    assert code == 2
    assert "NOT_FOUND" in err
    code, _, err = await taskgate(server_port, "enqueue", "demo.add", "1")
    assert code == 2
    assert "INVALID_ARGUMENT" in err


async def test_target_before_the_command(server_port: int) -> None:
    code, out, _ = await run_cli(
        "--target", f"127.0.0.1:{server_port}", "enqueue", "demo.add", "2", "3", "--wait"
    )
    assert code == 0
    assert "SUCCEEDED result: 5" in out


async def test_target_from_the_environment(server_port: int) -> None:
    env = {**os.environ, "TASKGATE_TARGET": f"127.0.0.1:{server_port}"}
    code, out, _ = await run_cli("enqueue", "demo.add", "1", "1", "--wait", env=env)
    assert code == 0
    assert "SUCCEEDED result: 2" in out
