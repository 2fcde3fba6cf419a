"""PgBouncer: what ``TASKGATE_DB_PGBOUNCER=1`` and a PgBouncer in transaction mode cost.

Three gateways on the same private database and Redis, started together and measured in
alternating rounds (each round starts with the next gateway): (a) direct to PostgreSQL
with the default settings (cached, named prepared statements), (b) direct with
``TASKGATE_DB_PGBOUNCER=1`` (no statement cache: the cost of the setting alone), (c)
through a private ``pgbouncer`` (Debian's package) in transaction pooling mode with the
setting (what a deployment behind PgBouncer pays).

Each round runs durable Enqueue (the Node load generator, ``plan.throughput_concurrency``
in flight) and EnqueueBatch (``python -m bench.loadgen``, ``plan.batch_size`` tasks per
call, ``plan.batch_concurrency`` in flight) against each gateway in turn, and waits until
the broker holds every acknowledged task and the gateway's CPU and its backends' have
settled before reading the counters, so the outbox's publish marks (written after the
LPUSH, for seconds after a burst) are counted in their own round. PostgreSQL CPU is that
of the backends serving one gateway only: the backends whose client port is one of the
gateway's (or, for (c), PgBouncer's) connections to PostgreSQL, so the idle gateways'
background loops are not counted. The gateways' lost-message pass is off (the bench
drains the broker between runs).

``python -m bench.pgbouncer [--quick]`` runs this section alone (``python -m bench --only
pgbouncer`` once it is registered there).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from bench.drive import LoadResult
from bench.enqueue import grpc_command
from bench.infra import (
    OUT,
    PG_ADMIN_URL,
    Children,
    PrivateDatabase,
    PrivateRedis,
    announce,
    cpu_seconds,
    free_port,
    python_env,
    wait_for_port,
)
from bench.plan import DEFAULT, QUICK, Plan
from bench.procstat import tcp_connections
from bench.servers import Server, start_taskgate

#: After the broker holds every task: wait (at most SETTLE_LIMIT s) until the gateway, its
#: backends and PgBouncer use less than SETTLED_CORES of a core over SETTLE_WINDOW s.
SETTLE_LIMIT = 60.0
SETTLE_WINDOW = 0.5
SETTLED_CORES = 0.15
#: Seconds of the no-load measurement of each gateway's background CPU (before and after the rounds).
IDLE_SECONDS = 3.0
#: Server connections PgBouncer keeps to PostgreSQL (the gateway's default pool is 10).
POOL_SIZE = 10

INI = """\
[databases]
* = host={host} port={port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
"""


class PrivatePgBouncer:
    """A ``pgbouncer`` of our own in transaction pooling mode, in front of ``database_url``.

    ``url`` is ``database_url`` with PgBouncer's port; ``close()`` stops it and removes its
    configuration. As root it runs as ``postgres`` (PgBouncer refuses to run as root).
    """

    def __init__(self, children: Children, database_url: str, *, pool_size: int, log: Path) -> None:
        if shutil.which("pgbouncer") is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
        target = make_url(database_url)
        self.port = free_port()
        self._children = children
        self._dir = Path(tempfile.mkdtemp(prefix="tgbench-pgbouncer-"))
        self._dir.chmod(0o755)  # readable by the postgres user
        users = self._dir / "users.txt"
        users.write_text(f'"{target.username}" ""\n')
        ini = self._dir / "pgbouncer.ini"
        ini.write_text(
            INI.format(
                host=target.host, port=target.port or 5432, listen=self.port, users=users, pool_size=pool_size
            )
        )
        command = ["pgbouncer", str(ini)]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "postgres"]
        log.write_bytes(b"")
        self.process = children.spawn(command, log=log)
        self.url = target.set(port=self.port).render_as_string(hide_password=False)
        wait_for_port(self.process, self.port, 15)

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        self._children.stop(self.process)
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class Round:
    """One load-generator run against one gateway; CPU in µs per call (per task for batches)."""

    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    gateway_us: float
    pg_us: float
    bouncer_us: float | None
    #: seconds the load generator ran (start-up and warm-up included)
    load_s: float
    #: seconds from the end of the load until the broker held every acknowledged task
    lag_s: float
    #: seconds after that until the gateway and its backends were back to background work
    settle_s: float


@dataclass
class Gateway:
    """One of the three contenders."""

    key: str
    label: str
    server: Server
    #: the process whose connections to PostgreSQL are this gateway's (PgBouncer for (c))
    db_client: int
    bouncer: int | None = None
    enqueue: list[Round] = field(default_factory=list)
    batch: list[Round] = field(default_factory=list)
    #: (gateway, PostgreSQL) CPU ms per second with no load, before and after the rounds
    idle: list[tuple[float, float]] = field(default_factory=list)


def _pg_port() -> int:
    return make_url(PG_ADMIN_URL).port or 5432


def _backends_by_port(db: PrivateDatabase) -> dict[int, int]:
    """Client port -> backend pid of every TCP connection to the bench database."""
    admin = make_url(PG_ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)

    async def query() -> dict[int, int]:
        connection = await asyncpg.connect(admin)
        try:
            rows = await connection.fetch(
                "SELECT pid, client_port FROM pg_stat_activity WHERE datname = $1 AND client_port > 0",
                db.name,
            )
        finally:
            await connection.close()
        return {int(row["client_port"]): int(row["pid"]) for row in rows}

    return asyncio.run(query())


def _backend_cpu(db: PrivateDatabase, gateway: Gateway) -> dict[int, float]:
    """CPU seconds of each backend serving ``gateway`` (through PgBouncer: PgBouncer's backends)."""
    ports = _backends_by_port(db)
    mine = [ports[port] for port in tcp_connections(gateway.db_client, _pg_port()) if port in ports]
    return {pid: cpu_seconds(pid) for pid in mine}


def _measure(
    children: Children,
    redis: PrivateRedis,
    db: PrivateDatabase,
    gateway: Gateway,
    command: list[str],
    *,
    tasks_per_call: int,
    timeout: float,
) -> Round:
    """Run ``command`` (a load generator), wait until the broker holds every acknowledged task."""
    redis.drain_broker()
    gateway_before = cpu_seconds(gateway.server.pid)
    bouncer_before = cpu_seconds(gateway.bouncer) if gateway.bouncer else 0.0
    pg_before = _backend_cpu(db, gateway)
    started = time.monotonic()
    line = children.run_json_line(
        command, log=OUT / f"loadgen-pgbouncer-{gateway.key}.log", env=python_env(), timeout=timeout
    )
    result = LoadResult.from_json(line)
    tasks = max(result.total_calls * tasks_per_call, 1)
    load_end = time.monotonic()
    deadline = load_end + 120
    while redis.queue_length() < tasks and time.monotonic() < deadline:
        time.sleep(0.02)
    published = time.monotonic()
    if redis.queue_length() < tasks:
        raise RuntimeError(
            f"{gateway.key}: fewer than {tasks} acknowledged tasks reached the broker in 120 s"
        )
    settled = _settle(db, gateway)
    pg_after = _backend_cpu(db, gateway)
    if result.errors:
        announce(f"pgbouncer {gateway.key}: {result.errors} errors, first: {result.first_error}")
    return Round(
        rate=result.rate * tasks_per_call,
        p50_ms=result.p50,
        p99_ms=result.p99,
        errors=result.errors,
        gateway_us=(cpu_seconds(gateway.server.pid) - gateway_before) / tasks * 1e6,
        pg_us=sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items()) / tasks * 1e6,
        bouncer_us=(cpu_seconds(gateway.bouncer) - bouncer_before) / tasks * 1e6 if gateway.bouncer else None,
        load_s=load_end - started,
        lag_s=published - load_end,
        settle_s=settled - published,
    )


def _serving_cpu(db: PrivateDatabase, gateway: Gateway) -> float:
    bouncer = cpu_seconds(gateway.bouncer) if gateway.bouncer else 0.0
    return cpu_seconds(gateway.server.pid) + bouncer + sum(_backend_cpu(db, gateway).values())


def _settle(db: PrivateDatabase, gateway: Gateway) -> float:
    """Wait until the gateway and its backends are back to background work; return when.

    The broker holds every task before the outbox has marked every row published (the marks
    are written after the LPUSH, in batches, for seconds after a burst of EnqueueBatch): that
    work belongs to this round, not to the next run on the same backends.
    """
    deadline = time.monotonic() + SETTLE_LIMIT
    before = _serving_cpu(db, gateway)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_WINDOW)
        now = _serving_cpu(db, gateway)
        if now - before < SETTLED_CORES * SETTLE_WINDOW:
            break
        before = now
    return time.monotonic()


def _idle(db: PrivateDatabase, gateways: list[Gateway]) -> None:
    """Each gateway's background CPU (its loops' polls, on its own backends) with no load."""
    before = [(cpu_seconds(g.server.pid), _backend_cpu(db, g)) for g in gateways]
    started = time.monotonic()
    time.sleep(IDLE_SECONDS)
    elapsed = time.monotonic() - started
    for gateway, (gateway_before, pg_before) in zip(gateways, before, strict=True):
        pg_after = _backend_cpu(db, gateway)
        pg = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items())
        gateway.idle.append(
            ((cpu_seconds(gateway.server.pid) - gateway_before) / elapsed * 1e3, pg / elapsed * 1e3)
        )


def _batch_command(plan: Plan, server: Server) -> list[str]:
    return [
        sys.executable, "-m", "bench.loadgen", "--target", server.target, "--method", "batch",
        "--batch-size", str(plan.batch_size), "--concurrency", str(plan.batch_concurrency),
        "--warmup", "0", "--duration", str(plan.throughput_duration), "--channels", "1",
    ]  # fmt: skip


def _rounds(
    plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase, gateways: list[Gateway]
) -> None:
    timeout = plan.warmup + plan.throughput_duration + 90
    for round_no in range(1, plan.rounds + 1):
        shift = (round_no - 1) % len(gateways)  # each gateway goes first in some round
        order = gateways[shift:] + gateways[:shift]
        for gateway in order:
            announce(f"pgbouncer round {round_no}/{plan.rounds}: {gateway.key} Enqueue")
            command = grpc_command(gateway.server, plan.channels)(
                plan.throughput_concurrency, plan.warmup, plan.throughput_duration
            )
            gateway.enqueue.append(
                _measure(children, redis, db, gateway, command, tasks_per_call=1, timeout=timeout)
            )
        for gateway in order:
            announce(
                f"pgbouncer round {round_no}/{plan.rounds}: {gateway.key} EnqueueBatch x{plan.batch_size}"
            )
            command = _batch_command(plan, gateway.server)
            gateway.batch.append(
                _measure(
                    children, redis, db, gateway, command, tasks_per_call=plan.batch_size, timeout=timeout
                )
            )


def _med(rounds: list[Round], pick: Callable[[Round], float | None]) -> float | None:
    values = [v for v in map(pick, rounds) if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


_COLUMNS: list[tuple[str, Callable[[Round], float | None], str]] = [
    ("calls/s", lambda r: r.rate, ",.0f"),
    ("p50 (ms)", lambda r: r.p50_ms, ".2f"),
    ("p99 (ms)", lambda r: r.p99_ms, ".2f"),
    ("gateway CPU (µs)", lambda r: r.gateway_us, ".0f"),
    ("PostgreSQL CPU (µs)", lambda r: r.pg_us, ".0f"),
    ("PgBouncer CPU (µs)", lambda r: r.bouncer_us, ".0f"),
]


def _table(
    title: str, unit: str, gateways: list[Gateway], pick: Callable[[Gateway], list[Round]]
) -> list[str]:
    headers = [name.replace("calls", unit) for name, _, _ in _COLUMNS]
    lines = [
        title,
        "",
        "| | " + " | ".join(headers) + " | errors |",
        "|---" + "|---:" * (len(headers) + 1) + "|",
    ]
    for gateway in gateways:
        rounds = pick(gateway)
        cells = [_fmt(_med(rounds, get), spec) for _, get, spec in _COLUMNS]
        lines.append(f"| {gateway.label} | " + " | ".join(cells) + f" | {sum(r.errors for r in rounds)} |")
    direct = pick(gateways[0])
    for gateway in gateways[1:]:
        cells = [_ratio(_med(pick(gateway), get), _med(direct, get)) for _, get, _ in _COLUMNS[:5]]
        lines.append(f"| ratio {gateway.key} / direct | " + " | ".join(cells) + " | | |")
    return lines


def _round_text(r: Round) -> str:
    return f"{r.rate:,.0f} ({r.pg_us:.0f}, {r.load_s:.0f}+{r.lag_s:.1f}+{r.settle_s:.1f}s)"


def _report(plan: Plan, gateways: list[Gateway], load: tuple[str, str], bouncer_errors: int) -> str:
    lines = [
        f"## PgBouncer (transaction pooling, {POOL_SIZE} server connections) — medians of {plan.rounds} "
        "alternating rounds, same database and Redis",
        "",
    ]
    lines += _table(
        f"Durable Enqueue demo.add, {plan.throughput_duration:g}s @{plan.throughput_concurrency} in flight "
        "(Node load generator); CPU per call",
        "calls",
        gateways,
        lambda g: g.enqueue,
    )
    lines.append("")
    lines += _table(
        f"EnqueueBatch, {plan.batch_size} tasks per call, {plan.batch_concurrency} calls in flight "
        "(python -m bench.loadgen); tasks/s, p50/p99 per call, CPU per task",
        "tasks",
        gateways,
        lambda g: g.batch,
    )
    errors = sum(r.errors for g in gateways for r in g.enqueue + g.batch)
    lines += [
        "",
        "Rounds, Enqueue calls/s and EnqueueBatch tasks/s (PostgreSQL CPU µs per call or task, "
        "seconds the load generator ran + until the broker held every task + until the gateway's "
        "CPU and its backends' settled): "
        + "; ".join(
            f"{g.key} {', '.join(_round_text(r) for r in g.enqueue)} and "
            f"{', '.join(_round_text(r) for r in g.batch)}"
            for g in gateways
        )
        + ".",
        f"With no load ({IDLE_SECONDS:g}s before / after the rounds), CPU ms per second of the gateway and "
        "of its PostgreSQL backends: "
        + "; ".join(
            f"{g.key} {' / '.join(f'{gw:.0f}' for gw, _ in g.idle)} and "
            f"{' / '.join(f'{pg:.0f}' for _, pg in g.idle)}"
            for g in gateways
        )
        + " (background loops: counted in the CPU per call above, so slow rounds cost more per call).",
        "(a) direct = default settings (asyncpg's statement cache, named prepared statements); (b) direct",
        "+ TASKGATE_DB_PGBOUNCER=1 = the setting's own cost (no statement cache, unnamed statements);",
        "(c) through PgBouncer with the setting = what a deployment behind PgBouncer pays. PostgreSQL CPU",
        "= the backends serving that gateway (for (c): PgBouncer's server connections); every round waits",
        "until Redis holds every acknowledged task and then until the gateway, its backends and",
        f"PgBouncer use < {SETTLED_CORES:g} core, so the outbox's publish marks are counted in their round.",
        f"Load average before / after the section: {load[0]} / {load[1]} (a shared machine: compare the",
        "ratios, not the absolute numbers).",
        "",
        "Targets (issue: works behind PgBouncer in transaction mode): no failed call through it: "
        f"{'MET' if errors == 0 else f'NOT MET ({errors} errors)'}; no 'prepared statement' error in "
        f"the gateways' logs: {'MET' if bouncer_errors == 0 else f'NOT MET ({bouncer_errors} lines)'}.",
    ]
    return "\n".join(lines)


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_pgbouncer(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Measure Enqueue and EnqueueBatch direct, with the setting, and through PgBouncer."""
    load_before = _load_average()
    bouncer = PrivatePgBouncer(children, db.url, pool_size=POOL_SIZE, log=OUT / "pgbouncer.log")
    servers: list[Server] = []
    try:
        announce(f"pgbouncer on port {bouncer.port}; starting three gateways")
        direct = start_taskgate(children, redis.url, db.url, log_name="taskgate-pg-direct.log")
        servers.append(direct)
        setting = start_taskgate(
            children,
            redis.url,
            db.url,
            log_name="taskgate-pg-setting.log",
            TASKGATE_DB_PGBOUNCER="1",
        )
        servers.append(setting)
        through = start_taskgate(
            children,
            redis.url,
            bouncer.url,
            log_name="taskgate-pg-bouncer.log",
            TASKGATE_DB_PGBOUNCER="1",
        )
        servers.append(through)
        gateways = [
            Gateway("direct", "(a) direct, default settings", direct, direct.pid),
            Gateway("setting", "(b) direct, TASKGATE_DB_PGBOUNCER=1", setting, setting.pid),
            Gateway(
                "pgbouncer", "(c) PgBouncer + TASKGATE_DB_PGBOUNCER=1", through, bouncer.pid, bouncer.pid
            ),
        ]
        _idle(db, gateways)
        _rounds(plan, children, redis, db, gateways)
        _idle(db, gateways)
        bad_lines = sum(server.log.read_bytes().count(b"prepared statement") for server in servers)
        return _report(plan, gateways, (load_before, _load_average()), bad_lines)
    finally:
        for server in servers:
            children.stop(server.process)
        bouncer.close()
        redis.drain_broker()


def main() -> None:
    """``python -m bench.pgbouncer [--quick]``: this section alone, on its own database and Redis."""
    parser = argparse.ArgumentParser(prog="python -m bench.pgbouncer", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    plan = QUICK if parser.parse_args().quick else DEFAULT
    OUT.mkdir(parents=True, exist_ok=True)
    children, db = Children(), PrivateDatabase()
    redis: PrivateRedis | None = None
    try:
        db.create()
        redis = PrivateRedis(children, OUT / "redis.log")
        print(run_pgbouncer(plan, children, redis, db), flush=True)
    finally:
        children.close()
        if redis is not None:
            redis.close()
        db.drop()


if __name__ == "__main__":
    main()
