"""The durable state feed's cost, end to end: feed on against feed off, in alternating runs.

Each run starts a gateway and a real Celery worker (prefork, concurrency 2) of its own on the
private Redis (key prefix ``bfeed-``) and database, both with the feed on (the worker's
``FeedRedisBackend``: SETEX + PUBLISH + XADD in one MULTI; the gateway's ``StateFeed``
consumer, TASKGATE_STATE_FEED=1) or both with it off (Celery's own ``RedisBackend``, as
``configure(app, feed=False)`` leaves it; TASKGATE_STATE_FEED=0: pub/sub and the reconcile
only). After a warm-up it enqueues N tasks with EnqueueBatch and measures, for each run:

- tasks/s from the first EnqueueBatch call until the database holds every task SUCCEEDED;
- CPU per task of the worker (every process of its session), the gateway, Redis and the
  gateway's PostgreSQL backends, up to when the feed is drained (nothing pending, no lag);
- rows of ``tasks`` updated per task (``n_tup_upd`` of the tasks table, read while no
  gateway runs, so every backend has flushed its statistics; the warm-up tasks included).

Runs alternate ON, OFF, ON x3, ON, OFF, ON x3… per workload (ON x3: feed on with three gateway
replicas, one consumer each of the feed's group; their CPU summed; issue 18): ``demo.add``
(2 states: STARTED, SUCCESS) and ``demo.progress(3, 0)`` (5 states: STARTED, 3 PROGRESS,
SUCCESS). The report gives medians, the ON/OFF ratio of the medians and the ratios' spread
over the round pairs.

``python -m bench.feed worker on|off CELERY-ARGS...`` is the worker the runs start.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, cpu_seconds
from bench.plan import Plan
from bench.servers import Server, broker_env, start_taskgate

KEY_PREFIX = "bfeed-"
#: Tasks run (and awaited) after start-up, before the measured ones.
WARMUP = 100
BATCH = 500
#: EnqueueBatch calls in flight.
IN_FLIGHT = 2
#: Seconds after the last SUCCEEDED and the drained feed before the CPU is read (both modes).
SETTLE = 0.5
#: Seconds of the idle window (after the warm-up, before the load).
IDLE = 2.0
_READY = re.compile(rb"@\S+ ready\.")


@dataclass(frozen=True)
class Workload:
    """A demo task and its arguments; ``states``: the states each run writes."""

    name: str
    args: tuple[Any, ...]
    states: int

    @property
    def label(self) -> str:
        return f"{self.name}({', '.join(map(str, self.args))})"


WORKLOADS = (Workload("demo.add", (1, 2), 2), Workload("demo.progress", (3, 0), 5))


@dataclass(frozen=True)
class Mode:
    """How the worker and the gateway of a run are set up."""

    label: str
    #: the worker's result backend: FeedRedisBackend (True) or Celery's RedisBackend
    worker_feed: bool
    #: the gateway's TASKGATE_STATE_FEED
    gateway_feed: bool
    #: more environment for both processes
    env: tuple[tuple[str, str], ...] = ()
    #: gateway processes (one consumer each of the feed's group; the first takes the calls)
    replicas: int = 1


ON = Mode("feed ON", worker_feed=True, gateway_feed=True)
OFF = Mode("feed OFF", worker_feed=False, gateway_feed=False)
#: issue 18: with N replicas every recorder hears every pub/sub update
ON3 = Mode("feed ON, 3 gateways", worker_feed=True, gateway_feed=True, replicas=3)


@dataclass
class Sample:
    """One run of one workload in one mode."""

    tasks_per_second: float
    worker_us: float
    gateway_us: float
    redis_us: float
    pg_us: float
    rows_per_task: float
    #: transactions committed in the database per task (the probe's own left out)
    commits_per_task: float
    #: CPU milliseconds per second of the idle gateway and worker, measured before the load
    gateway_idle_ms: float
    #: gateway CPU per task less its idle rate over the run: the work the tasks brought
    gateway_net_us: float
    worker_idle_ms: float
    #: seconds from the last SUCCEEDED in the database until the feed was drained
    drain_s: float


def session_cpu(session: int) -> float:
    """User + system CPU seconds of every live process of ``session`` (a child and its pool)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            total += cpu_seconds(int(stat.parent.name))
    return total


def _dsn(db: PrivateDatabase) -> str:
    return make_url(db.url).set(drivername="postgresql").render_as_string(hide_password=False)


def _start_worker(children: Children, redis: PrivateRedis, mode: Mode, name: str) -> Any:
    log = OUT / f"worker-feed-{name}.log"
    log.write_bytes(b"")
    command = [
        sys.executable, "-m", "bench.feed", "worker", "on" if mode.worker_feed else "off",
        "-P", "prefork", "-c", "2", "-n", f"{name}@%h", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    env = broker_env(redis.url, TASKGATE_KEY_PREFIX=KEY_PREFIX, **dict(mode.env))
    process = children.spawn(command, log=log, env=env)
    deadline = time.monotonic() + 60
    while not _READY.search(log.read_bytes()):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_bytes()[-2000:].decode(errors="replace")
            raise RuntimeError(f"the worker did not start (exit {process.poll()}):\n{tail}")
        time.sleep(0.1)
    return process


class _Probe:
    """Reads the database and Redis for one run (its own connection, left out of the PG CPU)."""

    def __init__(self, conn: asyncpg.Connection, redis: PrivateRedis, feed: bool) -> None:
        self.conn, self.redis, self.feed = conn, redis, feed
        #: statements this probe ran (each its own transaction)
        self.queries = 0

    async def pg_cpu(self) -> float:
        self.queries += 1
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return sum(cpu_seconds(row["pid"]) for row in rows)

    async def wait_succeeded(self, ids: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.queries += 1
            done = await self.conn.fetchval(
                "SELECT count(*) FROM tasks WHERE task_id = ANY($1::text[]) AND state = 'SUCCEEDED'", ids
            )
            if done == len(ids):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {len(ids)} tasks SUCCEEDED after {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def wait_drained(self, timeout: float = 120) -> None:
        """Until the gateways' group has read and acknowledged every entry (feed on only)."""
        if not self.feed:
            return
        stream = f"{KEY_PREFIX}taskgate-states"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            groups = self.redis.client.xinfo_groups(stream)
            info = self.redis.client.xinfo_stream(stream)
            last = info["last-generated-id"]
            if groups and all(g["pending"] == 0 and g["last-delivered-id"] == last for g in groups):
                return
            await asyncio.sleep(0.02)
        raise RuntimeError(f"the state feed was not drained after {timeout:.0f}s")


async def _enqueue(target: str, workload: Workload, count: int) -> list[str]:
    from taskgate.client import AsyncClient, TaskCall

    calls = [TaskCall(workload.name, workload.args) for _ in range(count)]
    chunks = [calls[i : i + BATCH] for i in range(0, count, BATCH)]
    ids: list[str] = []
    async with AsyncClient(target, timeout=60) as client:
        for start in range(0, len(chunks), IN_FLIGHT):
            done = await asyncio.gather(*(client.enqueue_batch(c) for c in chunks[start : start + IN_FLIGHT]))
            for chunk_ids in done:
                ids.extend(chunk_ids)
    return ids


async def _measure(
    servers: list[Server],
    worker_pid: int,
    redis: PrivateRedis,
    db: PrivateDatabase,
    feed: bool,
    workload: Workload,
    n: int,
) -> tuple[Sample, int]:
    server = servers[0]

    def gateways_cpu() -> float:
        return sum(session_cpu(each.pid) for each in servers)

    conn = await asyncpg.connect(_dsn(db))
    try:
        probe = _Probe(conn, redis, feed)
        await probe.wait_succeeded(await _enqueue(server.target, workload, WARMUP))
        await probe.wait_drained()
        await asyncio.sleep(SETTLE)
        idle = (session_cpu(worker_pid), gateways_cpu())
        await asyncio.sleep(IDLE)
        cpu = (session_cpu(worker_pid), gateways_cpu(), cpu_seconds(redis.process.pid))
        pg = await probe.pg_cpu()
        started = time.monotonic()
        await probe.wait_succeeded(await _enqueue(server.target, workload, n))
        succeeded = time.monotonic()
        await probe.wait_drained()
        drained = time.monotonic()
        await asyncio.sleep(SETTLE)
        pg = await probe.pg_cpu() - pg
        after = (session_cpu(worker_pid), gateways_cpu(), cpu_seconds(redis.process.pid))
        window = time.monotonic() - started
    finally:
        await conn.close()
    worker, gateway, redis_cpu = (a - b for a, b in zip(after, cpu, strict=True))
    per_task = 1e6 / n
    gateway_idle = (cpu[1] - idle[1]) / IDLE
    sample = Sample(
        tasks_per_second=n / (succeeded - started),
        worker_us=worker * per_task,
        gateway_us=gateway * per_task,
        redis_us=redis_cpu * per_task,
        pg_us=pg * per_task,
        rows_per_task=0.0,
        commits_per_task=0.0,
        gateway_idle_ms=gateway_idle * 1000,
        gateway_net_us=(gateway - gateway_idle * window) * per_task,
        worker_idle_ms=(cpu[0] - idle[0]) / IDLE * 1000,
        drain_s=drained - succeeded,
    )
    return sample, probe.queries


#: Statements ``_db_counts`` runs (each its own transaction).
_COUNT_QUERIES = 3


async def _db_counts(db: PrivateDatabase) -> tuple[int, int]:
    """Rows of ``tasks`` updated and transactions committed so far (flushed statistics)."""
    conn = await asyncpg.connect(_dsn(db))
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = await conn.fetchval("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'tasks'")
        commits = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return int(rows or 0), int(commits or 0)
    finally:
        await conn.close()


def run_once(
    children: Children,
    redis: PrivateRedis,
    db: PrivateDatabase,
    mode: Mode,
    workload: Workload,
    n: int,
    tag: str,
) -> Sample:
    """One run: a gateway and a worker set up as ``mode``, a warm-up, then ``n`` tasks."""
    rows_before, commits_before = asyncio.run(_db_counts(db))
    env = {
        "TASKGATE_KEY_PREFIX": KEY_PREFIX,
        "TASKGATE_STATE_FEED": "1" if mode.gateway_feed else "0",
        **dict(mode.env),
    }
    servers: list[Server] = []
    worker = None
    try:
        for replica in range(mode.replicas):
            log_name = f"taskgate-feed-{tag}-{replica}.log"
            servers.append(start_taskgate(children, redis.url, db.url, log_name=log_name, **env))
        worker = _start_worker(children, redis, mode, tag)
        measure = _measure(servers, worker.pid, redis, db, mode.gateway_feed, workload, n)
        sample, queries = asyncio.run(measure)
    finally:
        if worker is not None:
            children.stop(worker, timeout=15)
        for server in servers:
            children.stop(server.process, timeout=20)
    time.sleep(0.5)  # the backends' exit flushes their statistics
    rows, commits = asyncio.run(_db_counts(db))
    sample.rows_per_task = (rows - rows_before) / (n + WARMUP)
    sample.commits_per_task = (commits - commits_before - queries - _COUNT_QUERIES) / (n + WARMUP)
    return sample


_COLUMNS = (
    ("tasks/s to SUCCEEDED", "tasks_per_second", "{:,.0f}"),
    ("worker CPU/task (µs)", "worker_us", "{:,.0f}"),
    ("gateway CPU/task (µs)", "gateway_us", "{:,.0f}"),
    ("gateway CPU/task less idle (µs)", "gateway_net_us", "{:,.0f}"),
    ("Redis CPU/task (µs)", "redis_us", "{:,.0f}"),
    ("PG backends CPU/task (µs)", "pg_us", "{:,.0f}"),
    ("tasks rows updated/task", "rows_per_task", "{:.2f}"),
    ("DB commits/task", "commits_per_task", "{:.2f}"),
    ("idle gateway CPU (ms/s)", "gateway_idle_ms", "{:.0f}"),
    ("idle worker CPU (ms/s)", "worker_idle_ms", "{:.0f}"),
)


def table(
    workload: Workload, on: list[Sample], off: list[Sample], names: tuple[str, str] = ("ON", "OFF")
) -> list[str]:
    """Medians of both, the ratio of the medians and its spread over the round pairs."""
    a_name, b_name = names
    lines = [
        f"### {workload.label}: {workload.states} states per task",
        "",
        f"| | {a_name} (median) | {b_name} (median) | {a_name}/{b_name} | {a_name}/{b_name} per round pair "
        "(min to max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for title, field, fmt in _COLUMNS:
        a = [getattr(s, field) for s in on]
        b = [getattr(s, field) for s in off]
        ma, mb = statistics.median(a), statistics.median(b)
        pairs = [x / y for x, y in zip(a, b, strict=True) if y]
        spread = f"{min(pairs):.2f} to {max(pairs):.2f}" if pairs else "n/a"
        ratio = f"{ma / mb:.2f}" if mb else "n/a"
        lines.append(f"| {title} | {fmt.format(ma)} | {fmt.format(mb)} | {ratio} | {spread} |")
    drain = statistics.median(s.drain_s for s in on)
    lines.append("")
    lines.append(
        f"{a_name}: the feed drained a median {drain * 1000:.0f} ms after the last task read SUCCEEDED."
    )
    return lines


def _ratio(on: list[Sample], off: list[Sample], field: str) -> float:
    """ON/OFF of the medians of ``field``."""
    return float(
        statistics.median(getattr(s, field) for s in on) / statistics.median(getattr(s, field) for s in off)
    )


def _verdict(results: dict[Workload, tuple[list[Sample], list[Sample]]]) -> str:
    parts = []
    for workload, (on, off) in results.items():
        rate, worker, gateway = (
            _ratio(on, off, field) for field in ("tasks_per_second", "worker_us", "gateway_us")
        )
        parts.append(
            f"{workload.name}: rate x{rate:.2f}, worker CPU x{worker:.2f}, gateway CPU x{gateway:.2f}"
        )
    return "Verdict (ON/OFF medians): " + "; ".join(parts) + "."


def compare(
    children: Children,
    redis: PrivateRedis,
    db: PrivateDatabase,
    modes: tuple[Mode, ...],
    rounds: int,
    n: int,
) -> dict[Workload, dict[Mode, list[Sample]]]:
    """Per workload, ``rounds`` rounds of one run per mode, in turn (ABAB…)."""
    results: dict[Workload, dict[Mode, list[Sample]]] = {}
    for workload in WORKLOADS:
        samples: dict[Mode, list[Sample]] = {mode: [] for mode in modes}
        for round_no in range(1, rounds + 1):
            for number, mode in enumerate(modes):
                announce(f"{mode.label}, round {round_no}/{rounds}: {n} x {workload.label}")
                tag = f"{workload.name.split('.')[-1]}-{number}-{round_no}"
                samples[mode].append(run_once(children, redis, db, mode, workload, n, tag))
                announce(f"  {samples[mode][-1]}")
        results[workload] = samples
    return results


def run_feed(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Measure the state feed's cost (ON/OFF alternating runs); return the report section."""
    n = BATCH * max(2, round(plan.throughput_duration))
    measured = compare(children, redis, db, (ON, OFF, ON3), plan.rounds, n)
    results = {workload: (samples[ON], samples[OFF]) for workload, samples in measured.items()}
    lines = [
        f"## State feed: ON vs OFF end to end — {n} tasks per run (EnqueueBatch x{BATCH}, {IN_FLIGHT} in "
        f"flight), a prefork worker of concurrency 2, {plan.rounds} ON/OFF round pairs (ABAB)",
        "",
        "ON: the worker's FeedRedisBackend (SETEX + PUBLISH + XADD, one MULTI) and the gateway's StateFeed "
        "consumer, beside pub/sub and the recorder; OFF: Celery's RedisBackend and pub/sub only. CPU from "
        "the first EnqueueBatch until the feed is drained; rows from n_tup_upd of tasks (warm-up included).",
        "",
    ]
    for workload, (on, off) in results.items():
        lines.extend(table(workload, on, off))
        lines.append("")
        lines.extend(table(workload, measured[workload][ON3], off, names=("ON x3 gateways", "OFF")))
        lines.append("")
    lines.append(_verdict(results))
    return "\n".join(lines)


def worker_main(argv: list[str]) -> None:
    """``worker on|off CELERY-ARGS``: the workers app's worker, with or without the feed backend."""
    from workers import app

    mode, *args = argv
    if mode == "off":
        target: Any = app  # backend_cls is untyped in the stubs
        target.backend_cls = None  # Celery's RedisBackend, as configure(app, feed=False) leaves it
    app.worker_main(["worker", *args])


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m bench.feed worker on|off CELERY-ARGS...")
    worker_main(sys.argv[2:])
