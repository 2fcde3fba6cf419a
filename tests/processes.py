"""Gateway processes for the tests that stop, kill or replicate the server."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from service.config import Settings
from tests.conftest import ROOT, child_env

_LISTENING = re.compile(rb"taskgate listening on [^:]+:(\d+)")


@dataclass
class GatewayProcess:
    """A ``taskgate serve`` child process and what it printed."""

    process: asyncio.subprocess.Process
    port: int
    output: bytearray = field(default_factory=bytearray)
    _reader: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code


async def _pump(process: asyncio.subprocess.Process, output: bytearray) -> None:
    assert process.stdout is not None
    while line := await process.stdout.readline():
        output.extend(line)


async def run_serve(settings: Settings, **env: str) -> asyncio.subprocess.Process:
    """Start ``taskgate serve`` with this run's settings (stdout and stderr merged)."""
    environment = child_env(settings, **{"TASKGATE_LISTEN": "127.0.0.1:0", **env})
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve",
        cwd=ROOT, env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def start_gateway(settings: Settings, timeout: float = 30, **env: str) -> GatewayProcess:
    """Start a gateway process and wait until it listens."""
    process = await run_serve(settings, **env)
    assert process.stdout is not None
    output = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            line = await process.stdout.readline()
            if not line:
                raise AssertionError(f"gateway exited before listening:\n{output.decode(errors='replace')}")
            output.extend(line)
            if match := _LISTENING.search(line):
                break
    gateway = GatewayProcess(process, int(match.group(1)), output)
    gateway._reader = asyncio.create_task(_pump(process, output))
    return gateway


@contextlib.asynccontextmanager
async def gateway_process(settings: Settings, **env: str) -> AsyncIterator[GatewayProcess]:
    """A gateway process for the duration of the block (killed if still running)."""
    gateway = await start_gateway(settings, **env)
    try:
        yield gateway
    finally:
        if gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()
        if gateway._reader is not None:
            await gateway._reader
