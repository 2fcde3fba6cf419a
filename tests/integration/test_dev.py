"""`taskgate dev`: a private Redis, SQLite, a worker and the server from one command."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from tests.conftest import ROOT

_PID = re.compile(rb"started (redis-server|worker) \(pid (\d+)\)")
_PORT = re.compile(rb"taskgate listening on [^:]+:(\d+)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_dev_runs_everything_on_sqlite_and_ctrl_c_stops_it_all(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")}
    env.pop("DATABASE_URL", None)
    env.update(TASKGATE_LISTEN="127.0.0.1:0", PYTHONUNBUFFERED="1")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "dev",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output = bytearray()
    try:
        async with asyncio.timeout(60):
            while not (match := _PORT.search(output)):
                line = await process.stdout.readline()
                assert line, output.decode(errors="replace")
                output.extend(line)
        port = match.group(1).decode()
        assert b"sqlite+aiosqlite" in output
        watcher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "enqueue", "demo.progress", "3", "--kwargs", '{"interval": 0.1}',
            "--wait", "--target", f"127.0.0.1:{port}",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(watcher.communicate(), 90)
        assert watcher.returncode == 0, (out + err).decode()
        assert b"SUCCEEDED result: 3" in out
        process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
        output.extend(rest)
        assert process.returncode == 0, output.decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    children = {name: int(pid) for name, pid in _PID.findall(output)}
    assert set(children) == {b"redis-server", b"worker"}
    await asyncio.sleep(0.5)
    assert not [name for name, pid in children.items() if alive(pid)]
    assert (tmp_path / ".taskgate-dev" / "taskgate.db").exists()
