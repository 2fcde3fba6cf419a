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

Runs alternate ON, OFF, ON, OFF… per workload: ``demo.add`` (2 states: STARTED, SUCCESS) and
``demo.progress(3, 0)`` (5 states: STARTED, 3 PROGRESS, SUCCESS). The report gives medians,
the ON/OFF ratio of the medians and the ratios' spread over the round pairs.

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


@dataclass
class Sample:
    """One run of one workload in one mode."""

    tasks_per_second: float
    worker_us: float
    gateway_us: float
    redis_us: float
    pg_us: float
    rows_per_task: float
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


def _start_worker(children: Children, redis: PrivateRedis, feed: bool, name: str) -> Any:
    log = OUT / f"worker-feed-{name}.log"
    log.write_bytes(b"")
    command = [
        sys.executable, "-m", "bench.feed", "worker", "on" if feed else "off",
        "-P", "prefork", "-c", "2", "-n", f"{name}@%h", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    process = children.spawn(command, log=log, env=broker_env(redis.url, TASKGATE_KEY_PREFIX=KEY_PREFIX))
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

    async def pg_cpu(self) -> float:
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return sum(cpu_seconds(row["pid"]) for row in rows)

    async def wait_succeeded(self, ids: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
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
    server: Server,
    worker_pid: int,
    redis: PrivateRedis,
    db: PrivateDatabase,
    feed: bool,
    workload: Workload,
    n: int,
) -> tuple[Sample, float]:
    conn = await asyncpg.connect(_dsn(db))
    try:
        probe = _Probe(conn, redis, feed)
        await probe.wait_succeeded(await _enqueue(server.target, workload, WARMUP))
        await probe.wait_drained()
        await asyncio.sleep(SETTLE)
        cpu = (session_cpu(worker_pid), session_cpu(server.pid), cpu_seconds(redis.process.pid))
        pg = await probe.pg_cpu()
        started = time.monotonic()
        await probe.wait_succeeded(await _enqueue(server.target, workload, n))
        succeeded = time.monotonic()
        await probe.wait_drained()
        drained = time.monotonic()
        await asyncio.sleep(SETTLE)
        pg = await probe.pg_cpu() - pg
        after = (session_cpu(worker_pid), session_cpu(server.pid), cpu_seconds(redis.process.pid))
    finally:
        await conn.close()
    worker, gateway, redis_cpu = (a - b for a, b in zip(after, cpu, strict=True))
    per_task = 1e6 / n
    sample = Sample(
        tasks_per_second=n / (succeeded - started),
        worker_us=worker * per_task,
        gateway_us=gateway * per_task,
        redis_us=redis_cpu * per_task,
        pg_us=pg * per_task,
        rows_per_task=0.0,
        drain_s=drained - succeeded,
    )
    return sample, succeeded - started


async def _rows_updated(db: PrivateDatabase) -> int:
    conn = await asyncpg.connect(_dsn(db))
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await conn.fetchval("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'tasks'")
        return int(value or 0)
    finally:
        await conn.close()


def _run(
    children: Children,
    redis: PrivateRedis,
    db: PrivateDatabase,
    feed: bool,
    workload: Workload,
    n: int,
    tag: str,
) -> Sample:
    rows_before = asyncio.run(_rows_updated(db))
    env = {"TASKGATE_KEY_PREFIX": KEY_PREFIX, "TASKGATE_STATE_FEED": "1" if feed else "0"}
    server = start_taskgate(children, redis.url, db.url, log_name=f"taskgate-feed-{tag}.log", **env)
    worker = None
    try:
        worker = _start_worker(children, redis, feed, tag)
        sample, _ = asyncio.run(_measure(server, worker.pid, redis, db, feed, workload, n))
    finally:
        if worker is not None:
            children.stop(worker, timeout=15)
        children.stop(server.process, timeout=20)
    time.sleep(0.5)  # the backends' exit flushes their statistics
    sample.rows_per_task = (asyncio.run(_rows_updated(db)) - rows_before) / (n + WARMUP)
    return sample


_COLUMNS = (
    ("tasks/s to SUCCEEDED", "tasks_per_second", "{:,.0f}"),
    ("worker CPU/task (µs)", "worker_us", "{:,.0f}"),
    ("gateway CPU/task (µs)", "gateway_us", "{:,.0f}"),
    ("Redis CPU/task (µs)", "redis_us", "{:,.0f}"),
    ("PG backends CPU/task (µs)", "pg_us", "{:,.0f}"),
    ("tasks rows updated/task", "rows_per_task", "{:.2f}"),
)


def _table(workload: Workload, on: list[Sample], off: list[Sample]) -> list[str]:
    lines = [
        f"### {workload.label}: {workload.states} states per task",
        "",
        "| | feed ON (median) | feed OFF (median) | ON/OFF | ON/OFF per round pair (min to max) |",
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
    lines.append(f"Feed drained a median {drain * 1000:.0f} ms after the last task read SUCCEEDED.")
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


def run_feed(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Measure the state feed's cost (ON/OFF alternating runs); return the report section."""
    n = BATCH * max(2, round(plan.throughput_duration))
    results: dict[Workload, tuple[list[Sample], list[Sample]]] = {}
    for workload in WORKLOADS:
        on: list[Sample] = []
        off: list[Sample] = []
        for round_no in range(1, plan.rounds + 1):
            for feed, samples in ((True, on), (False, off)):
                mode = "on" if feed else "off"
                announce(f"feed {mode}, round {round_no}/{plan.rounds}: {n} x {workload.label}")
                tag = f"{workload.name.split('.')[-1]}-{mode}-{round_no}"
                samples.append(_run(children, redis, db, feed, workload, n, tag))
                announce(f"  {samples[-1]}")
        results[workload] = (on, off)
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
        lines.extend(_table(workload, on, off))
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
