"""Isolation for one run: child processes, a private redis-server, a private database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from service.store.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PG_ADMIN_URL = os.environ.get("TASKGATE_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far; 0 if it is gone or unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a Python child: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Children:
    """Every process this run started; ``close()`` stops them all (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        command: list[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` in its own session; stderr (and stdout unless piped) go to ``log``."""
        with log.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log_file,
                stderr=log_file,
                start_new_session=True,
            )
        self._processes.append(process)
        return process

    def run_json_line(self, command: list[str], *, log: Path, env: Mapping[str, str], timeout: float) -> str:
        """Run a load generator to completion and return the last line it printed."""
        process = self.spawn(command, log=log, env=env, stdout_pipe=True)
        try:
            stdout, _ = process.communicate(timeout=timeout)
        finally:
            self.stop(process)
        lines = stdout.decode().strip().splitlines()
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"{' '.join(command[:4])} failed (exit {process.returncode}); see {log}")
        return lines[-1]

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 5) -> None:
        """Stop one child (and anything it started in its session); SIGKILL after ``timeout``."""
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                announce(f"pid {process.pid} ignored SIGTERM for {timeout:g}s: killed")
                _signal_group(process, signal.SIGKILL)
                process.wait()
        else:
            _signal_group(process, signal.SIGKILL)  # leftovers of its session, if any
        if process in self._processes:
            self._processes.remove(process)

    def close(self) -> None:
        """Stop every child still known, newest first."""
        for process in reversed(list(self._processes)):
            self.stop(process)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the child leads its own session: pgid == pid


def wait_for_line(
    process: subprocess.Popen[bytes], log: Path, pattern: re.Pattern[bytes], timeout: float
) -> int:
    """Wait until ``log`` contains ``pattern`` (with one group: a port) and return that port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := pattern.search(log.read_bytes()):
            return int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_bytes()[-2000:].decode(errors="replace")
    raise RuntimeError(f"{process.args!r} did not start (exit {process.poll()}):\n{tail}")


def wait_for_port(process: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port} after {timeout:.0f}s")


class PrivateRedis:
    """A redis-server of our own on a free port, no persistence."""

    def __init__(self, children: Children, log: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(OUT), "--dbfilename", f"unused-{self.port}.rdb",
        ]  # fmt: skip
        self.process = children.spawn(command, log=log)
        wait_for_port(self.process, self.port, 10)
        self.client = redis.Redis.from_url(self.url)
        self.client.ping()

    def drain_broker(self) -> None:
        """Drop the piled-up task messages (nobody consumes them)."""
        self.client.delete("celery")

    def queue_length(self) -> int:
        return int(self.client.llen("celery"))

    def close(self) -> None:
        self.client.close()


def _admin(sql: str, **params: object) -> list[tuple[object, ...]]:
    async def run() -> list[tuple[object, ...]]:
        engine = create_async_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                result = await conn.execute(sa.text(sql), params)
                return [tuple(row) for row in result] if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


class PrivateDatabase:
    """``taskgate_bench_<random>``, migrated to the head; ``drop()`` removes it."""

    def __init__(self) -> None:
        self.name = f"taskgate_bench_{uuid.uuid4().hex[:10]}"
        self.url = make_url(PG_ADMIN_URL).set(database=self.name).render_as_string(hide_password=False)

    def create(self) -> None:
        upgrade(self.url)  # runs its own event loop: called outside any loop

    def backend_cpu(self) -> dict[int, float]:
        """CPU seconds of each PostgreSQL backend connected to this database (same host only)."""
        rows = _admin("SELECT pid FROM pg_stat_activity WHERE datname = :name", name=self.name)
        return {int(str(row[0])): cpu_seconds(int(str(row[0]))) for row in rows}

    def drop(self) -> None:
        _admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def announce(message: str) -> None:
    """Progress on stderr, so stdout stays the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
