"""The compose start check: run each service built from the Dockerfile as compose would, locally.

A parser cannot see a container that exits at start-up (``restart: unless-stopped`` then
crash-loops). So, for every service with a ``build``, this starts the service's ``command``
on this machine with the service's environment, resolved from the compose file (anchors and
``${VAR:-default}``, over the image's ``ENV``) and pointed at this machine:

- the hosts of image-only services (``redis``, ``postgres``) become the local Redis and
  PostgreSQL; ``DATABASE_URL`` names a private database and ``TASKGATE_KEY_PREFIX`` a private
  Redis key prefix, both created for the run and removed afterwards;
- the container ports a service listens on or publishes become free local ports (in its
  environment, its command and its healthcheck);
- paths of mounted secrets and bind volumes become the files they mount.

One-shot services (waited for with ``service_completed_successfully``) must exit 0; the others
must pass their healthcheck, or stay up for ``settle`` seconds (``devtools.compose_run``).
A service whose executable (or Celery sub-command) is not installed here is skipped with a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from devtools.compose_file import (
    Report,
    Spec,
    as_dict,
    dependency_graph,
    duration,
    environment,
    healthcheck_test,
    interpolate,
    services_of,
)
from devtools.dockerfile import image_env

PG_ADMIN_URL = os.environ.get("TASKGATE_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TASKGATE_TEST_REDIS", "redis://127.0.0.1:6379/0")
#: Longest wait for a healthcheck, whatever start_period + interval * retries says.
MAX_HEALTH_WAIT = 60.0
#: Celery sub-commands that need a package the app does not depend on.
CELERY_EXTRAS = {"flower": "flower"}
_PORT = re.compile(r"(?<=[:=])(\d{1,5})\b")
_IMAGES = ("redis", "postgres")


@dataclass(frozen=True)
class LocalStack:
    """The local Redis and PostgreSQL, and the private names of one run."""

    redis_url: str
    database_url: str
    key_prefix: str
    pg_admin_url: str = PG_ADMIN_URL

    def address(self, kind: str) -> str:
        """``host:port`` of the local ``redis`` or ``postgres``."""
        url = urlsplit(self.redis_url if kind == "redis" else self.pg_admin_url)
        default = 6379 if kind == "redis" else 5432
        return f"{url.hostname or '127.0.0.1'}:{url.port or default}"


@dataclass
class Launch:
    """One service, ready to start on this machine."""

    name: str
    argv: list[str]
    env: dict[str, str]
    oneshot: bool
    healthcheck: list[str] | None = None
    health_timeout: float = 30.0
    health_wait: float = 30.0


def _admin(url: str, sql: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    async def run() -> None:
        engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text(sql))
        finally:
            await engine.dispose()

    asyncio.run(run())


def _delete_keys(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@contextlib.contextmanager
def private_stack(pg_admin_url: str = PG_ADMIN_URL, redis_url: str = REDIS_URL) -> Iterator[LocalStack]:
    """A private (empty) database and Redis key prefix for one start check, removed afterwards."""
    from sqlalchemy.engine import make_url

    run = uuid.uuid4().hex[:10]
    name = f"taskgate_compose_{run}"
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    _admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield LocalStack(redis_url, url, f"tgcompose-{run}-", pg_admin_url)
    finally:
        _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _delete_keys(redis_url, f"tgcompose-{run}-")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_hosts(services: Mapping[str, Spec], stack: LocalStack) -> dict[str, str]:
    """{compose host name: local host:port} for the image-only Redis and PostgreSQL services."""
    hosts: dict[str, str] = {}
    for name, spec in services.items():
        image = str(spec.get("image", "")).rsplit("/", 1)[-1]
        kind = next((k for k in _IMAGES if image.startswith(k)), None)
        if "build" not in spec and kind is not None:
            hosts[name] = stack.address(kind)
    return hosts


def rewrite_url(value: str, hosts: Mapping[str, str]) -> str:
    """``value`` with its host:port replaced when it is a URL pointing at one of ``hosts``."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return value
    if host is None or host not in hosts:
        return value
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{hosts[host]}" if userinfo else hosts[host]
    return urlunsplit(parts._replace(netloc=netloc))


def swap_ports(text: str, ports: Mapping[int, int]) -> str:
    """``text`` with every ``:PORT`` / ``=PORT`` of a mapped container port replaced."""
    return _PORT.sub(lambda m: str(ports.get(int(m.group(1)), m.group(1))), text)


def container_ports(spec: Spec, env: Mapping[str, str]) -> set[int]:
    """The container ports a service publishes, and the port of its TASKGATE_LISTEN."""
    ports: set[int] = set()
    for entry in spec.get("ports") or []:
        target = as_dict(entry).get("target") if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        with contextlib.suppress(TypeError, ValueError):
            ports.add(int(str(target).split("/", 1)[0]))
    listen = env.get("TASKGATE_LISTEN", "")
    if listen.rpartition(":")[2].isdigit():
        ports.add(int(listen.rpartition(":")[2]))
    return ports


def mounts(spec: Spec, doc: Spec, base: Path) -> dict[str, Path]:
    """{container path: local path} of the service's file secrets and bind volumes."""
    found: dict[str, Path] = {}
    declared = as_dict(doc.get("secrets"))
    for entry in spec.get("secrets") or []:
        source = str(as_dict(entry).get("source", "")) if isinstance(entry, dict) else str(entry)
        target = str(as_dict(entry).get("target", source)) if isinstance(entry, dict) else source
        file = as_dict(declared.get(source)).get("file")
        if file is not None:
            path = target if target.startswith("/") else f"/run/secrets/{target}"
            found[path] = (base / interpolate(str(file))).resolve()
    for entry in spec.get("volumes") or []:
        if isinstance(entry, dict):
            outside, inside = entry.get("source"), entry.get("target")
            if entry.get("type") == "bind" and outside and inside:
                found[str(inside)] = (base / interpolate(str(outside))).resolve()
        elif str(entry).startswith((".", "/", "~")):
            host_path, _, rest = str(entry).partition(":")
            found[rest.split(":", 1)[0]] = (base / os.path.expanduser(interpolate(host_path))).resolve()
    return found


def map_paths(value: str, paths: Mapping[str, Path]) -> str:
    """``value`` with a mounted container path (or a path below one) replaced by the local one."""
    for inside, outside in paths.items():
        if value == inside or value.startswith(inside.rstrip("/") + "/"):
            return str(outside) + value[len(inside) :]
    return value


def executable(name: str) -> str | None:
    """``name`` from this interpreter's bin directory, else from PATH."""
    local = Path(sys.executable).parent / name
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def missing(argv: list[str]) -> str | None:
    """Why ``argv`` cannot run here, or None."""
    if not argv:
        return "no command (the image's CMD is not started by this check)"
    if executable(argv[0]) is None:
        return f"executable {argv[0]!r} is not installed here"
    if Path(argv[0]).name == "celery":
        for word, module in CELERY_EXTRAS.items():
            if word in argv and importlib.util.find_spec(module) is None:
                return f"`celery {word}` needs the {module!r} package, not installed here (bench extra)"
    return None


def base_env(home: Path) -> dict[str, str]:
    """What every local process gets besides the service's environment."""
    bin_dir = str(Path(sys.executable).parent)
    root = str(Path(__file__).resolve().parent.parent)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home),
            "LANG": os.environ.get("LANG", "C.UTF-8"), "PYTHONPATH": root}  # fmt: skip


def service_env(spec: Spec, doc: Spec, compose_path: Path, stack: LocalStack, home: Path) -> dict[str, str]:
    """The environment of the service ``spec`` as compose would give it, pointed at this machine."""
    services = services_of(doc)
    build = spec.get("build")
    build = {"context": build} if isinstance(build, str) else as_dict(build)
    dockerfile = (
        compose_path.parent / str(build.get("context", ".")) / str(build.get("dockerfile", "Dockerfile"))
    )
    target = build.get("target")
    env = {
        k: v for k, v in image_env(dockerfile, None if target is None else str(target)).items() if k != "PATH"
    }
    env.update({k: interpolate(v) for k, v in environment(spec).items() if v is not None})
    hosts, paths = local_hosts(services, stack), mounts(spec, doc, compose_path.parent)
    env = {k: map_paths(rewrite_url(v, hosts), paths) for k, v in env.items()}
    env.update(DATABASE_URL=stack.database_url, TASKGATE_KEY_PREFIX=stack.key_prefix)
    return {**base_env(home), **env}


def health_command(spec: Spec, ports: Mapping[int, int]) -> list[str] | None:
    """The healthcheck as a local command (container ports swapped), or None."""
    test = healthcheck_test(spec)
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not isinstance(test, list) or len(test) < 2 or test[0] not in ("CMD", "CMD-SHELL"):
        return None
    args = [swap_ports(str(arg), ports) for arg in test[1:]]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(args)]
    return [executable(args[0]) or args[0], *args[1:]]


def _command(spec: Spec) -> list[str]:
    raw = spec.get("command")
    if isinstance(raw, str):
        return shlex.split(raw)
    return [str(arg) for arg in raw] if isinstance(raw, list) else []


def launch(name: str, doc: Spec, compose_path: Path, stack: LocalStack, home: Path) -> Launch:
    """Everything needed to start service ``name`` locally."""
    spec = services_of(doc)[name]
    env = service_env(spec, doc, compose_path, stack, home)
    ports = {port: free_port() for port in container_ports(spec, env)}
    env = {k: swap_ports(v, ports) if k == "TASKGATE_LISTEN" else v for k, v in env.items()}
    paths = mounts(spec, doc, compose_path.parent)
    argv = [map_paths(swap_ports(arg, ports), paths) for arg in _command(spec)]
    graph = dependency_graph(services_of(doc))
    oneshot = any(deps.get(name) == "service_completed_successfully" for deps in graph.values())
    check = as_dict(spec.get("healthcheck"))
    wait = duration(check.get("start_period"), 0) + duration(check.get("interval"), 30) * int(
        check.get("retries", 3)
    )
    return Launch(
        name=name,
        argv=[executable(argv[0]) or argv[0], *argv[1:]] if argv else [],
        env=env,
        oneshot=oneshot,
        healthcheck=health_command(spec, ports),
        health_timeout=duration(check.get("timeout"), 30),
        health_wait=min(wait, MAX_HEALTH_WAIT),
    )


def start_order(doc: Spec, names: list[str]) -> list[str]:
    """``names`` with every service after the ones it depends on (file order otherwise)."""
    graph = dependency_graph(services_of(doc))
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in ordered or name in path or name not in names:
            return
        for target in graph.get(name, {}):
            visit(target, (*path, name))
        ordered.append(name)

    for name in names:
        visit(name, ())
    return ordered


def plan(
    doc: Spec,
    compose_path: Path,
    stack: LocalStack,
    home: Path,
    report: Report,
    only: list[str] | None = None,
) -> list[Launch]:
    """A launch per service built from a Dockerfile (those in ``only``), in start order.

    Services that cannot run here are left out with a note in ``report``.
    """
    built = [name for name, spec in services_of(doc).items() if "build" in spec]
    for name in sorted(set(only or ()) - set(built)):
        report.fail(f"{name}: not a service built from a Dockerfile")
    launches: list[Launch] = []
    for name in start_order(doc, [n for n in built if only is None or n in only]):
        (home / name).mkdir(parents=True, exist_ok=True)
        item = launch(name, doc, compose_path, stack, home / name)
        why = missing(_command(services_of(doc)[name]))
        if why:
            report.note(f"{name}: not started: {why}")
        else:
            launches.append(item)
    return launches
