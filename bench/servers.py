"""Starting the servers under test as processes of their own."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.infra import OUT, Children, python_env, wait_for_line

_TASKGATE_LISTENING = re.compile(rb"taskgate listening on [^:\s]+:(\d+)")
_NAIVE_LISTENING = re.compile(rb"naive listening on [^:\s]+:(\d+)")


@dataclass
class Server:
    """A server process and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


#: ``TASKGATE_LOST_QUEUED_AFTER`` that never comes (seconds): the lost-message pass off.
LOST_QUEUED_OFF = "1000000000"


def broker_env(redis_url: str, **extra: str) -> dict[str, str]:
    """A child's environment pointing Celery at the private Redis."""
    return python_env(CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url, **extra)


def start_taskgate(
    children: Children, redis_url: str, database_url: str, *, log_name: str = "taskgate.log", **env: str
) -> Server:
    """``python -m service serve`` on a free port (its log, at its default INFO level, to a file).

    The lost-message pass is off unless ``env`` sets ``TASKGATE_LOST_QUEUED_AFTER``: no worker
    consumes here and the bench drains the broker between rounds, so 30 s later every drained
    task would look lost and be republished — load of its own in the later rounds only.
    """
    log = OUT / log_name
    log.write_bytes(b"")
    env = {"TASKGATE_LOST_QUEUED_AFTER": LOST_QUEUED_OFF, **env}
    environment = broker_env(redis_url, DATABASE_URL=database_url, TASKGATE_LISTEN="127.0.0.1:0", **env)
    process = children.spawn([sys.executable, "-m", "service", "serve"], log=log, env=environment)
    port = wait_for_line(process, log, _TASKGATE_LISTENING, timeout=60)
    return Server("taskgate", process, port, log)


def start_naive(children: Children, redis_url: str) -> Server:
    """The naive gateway (``bench.naive``) on a free port."""
    log = OUT / "naive.log"
    log.write_bytes(b"")
    command = [sys.executable, "-m", "bench.naive", "--listen", "127.0.0.1:0"]
    process = children.spawn(command, log=log, env=broker_env(redis_url))
    port = wait_for_line(process, log, _NAIVE_LISTENING, timeout=60)
    return Server("naive", process, port, log)
