"""``taskgate dev``: everything taskgate needs on one machine, started and stopped together.

A private ``redis-server`` on a free port (its data in memory only), an SQLite database
under ``.taskgate-dev/``, one Celery worker and the gateway. Ctrl-C stops all of them.
Explicit ``CELERY_BROKER_URL`` / ``DATABASE_URL`` settings are used instead where given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from service.config import Settings
from service.store.migrate import upgrade

log = logging.getLogger(__name__)

STATE_DIR = Path(".taskgate-dev")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@contextlib.contextmanager
def _child(command: list[str], env: dict[str, str], name: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, env=env, start_new_session=True)
    log.info("started %s (pid %d)", name, process.pid)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.info("stopped %s", name)


@contextlib.contextmanager
def _redis(state: Path) -> Iterator[str]:
    """A private redis-server; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("taskgate dev needs redis-server on PATH (Debian: apt-get install redis-server)")
    port = _free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(state), "--logfile", str(state / "redis.log")]
    with _child(command, dict(os.environ), "redis-server"):
        _wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"


def run(settings: Settings) -> int:
    """Run redis, a worker and the gateway until Ctrl-C."""
    from service.api.server import masked_url, serve

    STATE_DIR.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        overrides: dict[str, str] = {}
        if "CELERY_BROKER_URL" not in os.environ:
            url = stack.enter_context(_redis(STATE_DIR.resolve()))
            overrides.update(CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url)
        if "DATABASE_URL" not in os.environ:
            overrides["DATABASE_URL"] = f"sqlite+aiosqlite:///{(STATE_DIR / 'taskgate.db').resolve()}"
        env = {**os.environ, **overrides}
        dev_settings = Settings.model_validate({**settings.model_dump(), **_fields(overrides)})
        upgrade(dev_settings.database_url)
        worker = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "threads", "-c", "4"]
        stack.enter_context(_child([*worker, "-l", "INFO", "-n", "dev@%h"], env, "worker"))
        target = dev_settings.listen
        print(
            f"\ntaskgate is up on {target} (database {masked_url(dev_settings.database_url)}, "
            f"broker {masked_url(dev_settings.broker_url)})\ntry, from another terminal:\n"
            f"  npx buf curl --protocol grpc --http2-prior-knowledge "
            f'-d \'{{"task_name":"demo.progress","args":[5]}}\' '
            f"http://{target}/taskgate.v1.TaskService/Enqueue\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(dev_settings))
    return 0


def _fields(overrides: dict[str, str]) -> dict[str, str]:
    names = {
        "CELERY_BROKER_URL": "broker_url",
        "CELERY_RESULT_BACKEND": "result_backend",
        "DATABASE_URL": "database_url",
    }
    return {names[key]: value for key, value in overrides.items()}
