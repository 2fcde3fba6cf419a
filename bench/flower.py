"""Flower (``celery -A workers flower``) on the private Redis, its HTTP API open."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

from bench.infra import OUT, Children, free_port, wait_for_port
from bench.servers import Server, broker_env

ASYNC_APPLY_PATH = "/api/task/async-apply/demo.add"


def start_flower(children: Children, redis_url: str, timeout: float = 60) -> Server:
    """Start Flower on ``redis_url`` and wait until its API answers a real async-apply."""
    return start_flower_env(children, broker_env(redis_url), OUT / "flower.log", timeout)


def start_flower_env(children: Children, env: dict[str, str], log: Path, timeout: float = 60) -> Server:
    """Start Flower with the broker settings of ``env`` (its HTTP API open) and wait until
    the API answers a real async-apply."""
    log.write_bytes(b"")
    port = free_port()
    command = [
        sys.executable, "-m", "celery", "-A", "workers", "flower",
        f"--port={port}", "--address=127.0.0.1", "--logging=warning",
    ]  # fmt: skip
    process = children.spawn(command, log=log, env={**env, "FLOWER_UNAUTHENTICATED_API": "true"})
    wait_for_port(process, port, timeout)
    _wait_for_api(port, timeout)
    return Server("flower", process, port, log)


def _wait_for_api(port: int, timeout: float) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{ASYNC_APPLY_PATH}",
        data=b'{"args": [2, 3]}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
