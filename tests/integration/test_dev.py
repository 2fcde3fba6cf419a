"""`taskgate dev`: a private Redis, SQLite, a worker and the server from one command.

``DevProcess`` runs ``taskgate dev`` (or ``make dev``) as a subprocess in a process group of
its own; the other ``test_dev_*`` modules use it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_PID = re.compile(rb"started (redis-server|worker) \(pid (\d+)\)")
_PORT = re.compile(rb"taskgate listening on [^:]+:(\d+)")
_REDIS = re.compile(rb"redis-server (\S+): (\S+) \(data in")
_PYTHON_CALL = re.compile(rb"^  (\S+ -c .*demo\.add.*)$", re.MULTILINE)
_BUF_CALL = re.compile(rb"^  (\S+ curl .*)$", re.MULTILINE)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != b"Z":
                members.append(int(entry.name))
    return members


def dev_env(path: str | None = None) -> dict[str, str]:
    """The environment of a `taskgate dev` that starts its own Redis and SQLite on a free port."""
    drop = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env.update(TASKGATE_LISTEN="127.0.0.1:0", PYTHONUNBUFFERED="1")
    if path is not None:
        env["PATH"] = path
    return env


class DevProcess:
    """``taskgate dev`` (or any command that runs it) in its own process group."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = bytearray()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, cwd: Path, env: Mapping[str, str], command: Sequence[str] = (), timeout: float = 60
    ) -> DevProcess:
        """Start ``command`` (default ``python -m service dev``) and wait until the server listens."""
        argv = list(command) or [sys.executable, "-m", "service", "dev"]
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=dict(env), start_new_session=True,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        dev = cls(process)
        try:
            await dev.wait_for(_PORT, timeout)
        except BaseException:
            await dev.kill()
            raise
        return dev

    async def _read(self) -> None:
        """Keep reading its output (a full pipe would block the worker's logging)."""
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output.extend(line)

    async def wait_for(self, pattern: re.Pattern[bytes], timeout: float = 60) -> re.Match[bytes]:
        """The first match of ``pattern`` in its output, once it is printed."""
        async with asyncio.timeout(timeout):
            while not (match := pattern.search(self.output)):
                assert not self._reader.done(), self.text()
                await asyncio.sleep(0.05)
        return match

    def text(self) -> str:
        """Everything printed so far."""
        return self.output.decode(errors="replace")

    @property
    def target(self) -> str:
        """The gateway's address."""
        match = _PORT.search(self.output)
        assert match, self.text()
        return f"127.0.0.1:{match.group(1).decode()}"

    @property
    def redis(self) -> tuple[str, str]:
        """The version and path of the redis-server it started."""
        match = _REDIS.search(self.output)
        assert match, self.text()
        return match.group(1).decode(), match.group(2).decode()

    def banner_call(self, tool: str) -> str | None:
        """The ready-made call of the banner: ``python`` (the client one-liner) or ``buf``."""
        match = (_PYTHON_CALL if tool == "python" else _BUF_CALL).search(self.output)
        return match.group(1).decode() if match else None

    def children(self) -> dict[str, int]:
        """The pids of the redis-server and the worker, from its log."""
        return {name.decode(): int(pid) for name, pid in _PID.findall(self.output)}

    async def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C: SIGINT to the whole process group, as a terminal sends it; the exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        async with asyncio.timeout(timeout):
            await self._reader
            return await self.process.wait()

    async def kill(self) -> None:
        """SIGKILL to the children it logged and to its process group (cleanup after a failure).

        The children go first: they hold its output pipe, and before Python 3.12 ``wait()``
        returns only once that pipe is closed.
        """
        for pid in self.children().values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # each child leads a session of its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()
        await self._reader

    async def assert_nothing_left(self) -> None:
        """No child of it and nothing in its process group is alive."""
        children = self.children()
        assert set(children) == {"redis-server", "worker"}, self.text()
        for _ in range(50):
            left = [pid for pid in [*children.values(), *group_members(self.process.pid)] if alive(pid)]
            if not left:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"still alive after Ctrl-C: {left}\n{self.text()}")


async def run_shell(line: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 90) -> str:
    """Run ``line`` with sh, as a person pastes it; its output (it must succeed)."""
    process = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", line, cwd=cwd, env=None if env is None else dict(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, f"{line}\n{out.decode(errors='replace')}"
    return out.decode()


async def test_dev_runs_everything_on_sqlite_and_ctrl_c_stops_it_all(tmp_path: Path) -> None:
    dev = await DevProcess.start(tmp_path, dev_env())
    try:
        assert "sqlite+aiosqlite" in dev.text()
        system_redis = shutil.which("redis-server")
        if system_redis is not None:  # a redis-server on PATH wins over the bundled one
            assert dev.redis[1] == system_redis
        python_call = dev.banner_call("python")
        assert python_call is not None, dev.text()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        assert (await run_shell(python_call, elsewhere)).strip() == "5"
        buf_call = dev.banner_call("buf")
        if buf_call is not None:  # printed only where buf is found; it must then work anywhere
            assert '"taskId"' in await run_shell(buf_call, elsewhere)
        assert await dev.interrupt() == 0, dev.text()
    except BaseException:
        await dev.kill()
        raise
    await dev.assert_nothing_left()
    assert (tmp_path / ".taskgate-dev" / "taskgate.db").exists()
    assert (tmp_path / ".taskgate-dev" / "redis" / "redis.log").exists()
