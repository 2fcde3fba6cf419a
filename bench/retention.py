"""Enqueue while retention deletes a backlog of expired tasks (the operations section, part 2).

A database of its own is filled with ``plan.list_large`` finished tasks, all of them
expiring a few seconds after one gateway (``TASKGATE_RETENTION`` set to match) has
started: its first retention pass finds nothing, the next one (``RETENTION_INTERVAL``
later) deletes them all, batch by batch. Enqueue is measured without a pause from the
start to the end; each measurement is classified by the expired rows left before and
after it — *before* (none deleted yet), *during* (deletion under way from its start to its
end), *after* (none left), or straddling (left out). Target: during ≥ 0.9 of the rest.

On a busy machine those phases spread by more than the 10% they should resolve, so the
same database is then filled again (``ALONE_ROWS``) and the store's batches run alone,
paced as the gateway paces them, on one connection whose PostgreSQL backend's CPU is read:
the share of a core the deletion takes while it runs, which is what it can take from Enqueue.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.enqueue import Sample, System, grpc_command, measure
from bench.infra import Children, PrivateDatabase, PrivateRedis, announce, cpu_seconds, python_env
from bench.plan import Plan
from bench.servers import Server, start_taskgate
from service.store.operations import OperationsStore
from service.usecases.operations import (
    RETENTION_BATCH,
    RETENTION_INTERVAL,
    RETENTION_PAUSE,
    RETENTION_SLOWDOWN,
)

#: The retention gateway: nothing else on (the lost-message pass is off in every bench
#: gateway, ``start_taskgate``).
_ENV = {"TASKGATE_METRICS_LISTEN": "", "OTEL_TRACES_EXPORTER": "none"}
_RETENTION_DONE = re.compile(rb"retention: deleted (\d+) tasks finished before \S+ in ([\d.]+)s")
#: Seconds after the gateway is launched at which the filled rows expire: later than its first
#: retention pass (at start-up, which took 10 s and more on a busy machine), earlier than its
#: second (RETENTION_INTERVAL after the first).
EXPIRE_AFTER = 45.0
#: Expired rows of the second, store-only measurement (at most the section's size).
ALONE_ROWS = 200_000
#: Give up on the measurement after this many seconds of measuring.
RETENTION_TIMEOUT = 1200.0


_FILL = """
INSERT INTO tasks (task_id, task_name, state, queue, args, kwargs, options, caller, fingerprint,
                   retries, create_time, run_time, update_time, end_time, cancel_requested)
SELECT 'old-' || lpad(n::text, 9, '0'), 'demo.add', 'SUCCEEDED', 'celery',
       '[1, 2]'::jsonb, '{}'::jsonb, '{}'::jsonb, '', 'x', 0, t, t, t, t, false
FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS n,
     LATERAL (SELECT CAST(:newest AS timestamptz) - n * interval '1 microsecond') AS s(t)
"""
_EXPIRED = "SELECT count(*) FROM tasks WHERE state IN ('CANCELLED', 'FAILED', 'SUCCEEDED')"
_VACUUM = "SELECT autovacuum_count, n_dead_tup FROM pg_stat_user_tables WHERE relname = 'tasks'"


async def _execute(url: str, *statements: tuple[str, dict[str, object]]) -> list[tuple[object, ...]]:
    engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        rows: list[tuple[object, ...]] = []
        async with engine.connect() as conn:
            for sql, params in statements:
                result = await conn.execute(sa.text(sql), params)
                rows = [tuple(row) for row in result] if result.returns_rows else []
        return rows
    finally:
        await engine.dispose()


def _fill(url: str, count: int, newest: dt.datetime) -> None:
    chunk = 250_000
    for first in range(1, count + 1, chunk):
        last = min(first + chunk - 1, count)
        params: dict[str, object] = {"first": first, "last": last, "newest": newest}
        asyncio.run(_execute(url, (_FILL, params)))
    asyncio.run(_execute(url, ("VACUUM ANALYZE tasks", {})))


def _expired(url: str) -> int:
    return int(str(asyncio.run(_execute(url, (_EXPIRED, {})))[0][0]))


@dataclass(frozen=True)
class Alone:
    """Retention's batches by themselves, paced as the gateway paces them."""

    rows: int
    batches: int
    seconds: float
    pg_cpu: float
    client_cpu: float

    def text(self) -> str:
        per_k = 1000 / max(self.rows, 1)
        return "\n".join(
            [
                f"The store alone, paced as in the gateway (pause ≥ {RETENTION_PAUSE:g}s and ≥ "
                f"{RETENTION_SLOWDOWN:g}x the batch): {self.rows:,} rows in {self.batches} batches, "
                f"{self.seconds:.1f}s ({self.rows / self.seconds:,.0f}/s);",
                f"PostgreSQL CPU {self.pg_cpu * 1000 * per_k:.1f} ms and caller CPU "
                f"{self.client_cpu * 1000 * per_k:.1f} ms per 1,000 rows: the deletion keeps "
                f"{self.pg_cpu / self.seconds:.1%} of one core busy in PostgreSQL and "
                f"{self.client_cpu / self.seconds:.1%} in the gateway while it runs.",
            ]
        )


async def _delete_alone(url: str) -> Alone:
    """Delete every expired task through ``OperationsStore`` on one connection, timing it."""
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    store = OperationsStore(engine)
    try:
        async with engine.connect() as conn:
            pid = int(str(await conn.scalar(sa.text("SELECT pg_backend_pid()"))))
        before = dt.datetime.now(dt.UTC)
        since: dt.datetime | None = None
        rows = batches = 0
        pg_start, cpu_start, started = cpu_seconds(pid), time.process_time(), time.monotonic()
        while True:
            batch_start = time.monotonic()
            batch = await store.delete_finished(before, RETENTION_BATCH, since=since)
            took = time.monotonic() - batch_start
            rows, batches, since = rows + batch.count, batches + 1, batch.newest or since
            if batch.count < RETENTION_BATCH:
                break
            await asyncio.sleep(max(RETENTION_PAUSE, RETENTION_SLOWDOWN * took))
        return Alone(
            rows,
            batches,
            time.monotonic() - started,
            cpu_seconds(pid) - pg_start,
            time.process_time() - cpu_start,
        )
    finally:
        await engine.dispose()


@dataclass
class Phases:
    """The retention gateway's measurements by what retention was doing meanwhile."""

    throughput: dict[str, list[Sample]] = field(default_factory=dict)
    latencies: dict[str, list[Sample]] = field(default_factory=dict)
    #: worst event-loop stall (ms) of the deleting gateway per phase
    stalls: dict[str, float] = field(default_factory=dict)


def _phase(left_before: int, left_after: int, total: int) -> str:
    if left_before == total and left_after == total:
        return "before"
    if left_before == 0:
        return "after"
    if left_before < total and left_after > 0:
        return "during"
    return "straddling"


def _measure_phases(plan: Plan, children: Children, redis: PrivateRedis, system: System, url: str,
                    total: int) -> Phases:  # fmt: skip
    phases = Phases()
    started = time.monotonic()
    left = _expired(url)
    while time.monotonic() - started < RETENTION_TIMEOUT:
        for kind, concurrency, duration in (
            ("throughput", plan.throughput_concurrency, plan.throughput_duration),
            ("latency", plan.latency_concurrency, plan.latency_duration),
        ):
            stalls_seen = len(system.stalls)
            sample = measure(children, redis, system, concurrency, plan.warmup, duration)
            now_left = _expired(url)
            phase = _phase(left, now_left, total)
            announce(
                f"retention: {kind} {sample.result.rate:.0f}/s, {left:,} → {now_left:,} expired rows: {phase}"
            )
            left = now_left
            target = phases.throughput if kind == "throughput" else phases.latencies
            target.setdefault(phase, []).append(sample)
            if len(system.stalls) > stalls_seen:
                worst = system.stalls[-1].busy_max_ms
                phases.stalls[phase] = max(phases.stalls.get(phase, 0.0), worst)
        if len(phases.latencies.get("after", [])) >= plan.rounds:
            break
    return phases


def run_retention(plan: Plan, children: Children, redis: PrivateRedis) -> str:
    """Enqueue before, during and after retention deletes ``plan.list_large`` expired tasks."""
    total = plan.list_large
    own = PrivateDatabase()
    own.create()
    server: Server | None = None
    try:
        newest = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        announce(f"retention: filling {total:,} finished tasks")
        fill_start = time.monotonic()
        _fill(own.url, total, newest)
        fill_s = time.monotonic() - fill_start
        # the rows expire EXPIRE_AFTER s from now: the first retention pass finds nothing
        retention = (dt.datetime.now(dt.UTC) - newest).total_seconds() + EXPIRE_AFTER
        server = start_taskgate(
            children, redis.url, own.url, log_name="taskgate-ops-retention.log",
            **{**_ENV, "TASKGATE_RETENTION": f"{retention:.3f}"},
        )  # fmt: skip
        system = System("retention", "retention gateway", server, grpc_command(server, plan.channels),
                        python_env(), pg=own, stalls_watched=True)  # fmt: skip
        phases = _measure_phases(plan, children, redis, system, own.url, total)
        vacuum = asyncio.run(_execute(own.url, (_VACUUM, {})))
        done = _RETENTION_DONE.findall(server.log.read_bytes())
        children.stop(server.process)
        server = None
        rows = min(total, ALONE_ROWS)
        announce(f"retention: {rows:,} more expired tasks, deleted by the store alone")
        _fill(own.url, rows, newest)
        alone = asyncio.run(_delete_alone(own.url))
    finally:
        if server is not None:
            children.stop(server.process)
        own.drop()
    return _retention_report(plan, total, fill_s, phases, done, vacuum) + "\n" + alone.text()


def _spread(values: list[float], spec: str) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def _phase_line(label: str, tps: list[Sample], lats: list[Sample], stall: float | None) -> str:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "—"

    rates = [s.result.rate for s in tps]
    return (
        f"{label:<12} {len(tps):>3}/{len(lats):<3} {_spread(rates, '.0f'):>22} "
        f"{med([s.result.p99 for s in tps]):>11} {med([s.result.p50 for s in lats]):>11} "
        f"{med([s.result.p99 for s in lats]):>11} {med([s.pg_ms or 0.0 for s in tps]):>10} "
        f"{'—' if stall is None else f'{stall:.1f}':>9}"
    )


def _ratio_line(label: str, a: list[Sample], b: list[Sample], value: Callable[[Sample], float]) -> str:
    if not a or not b:
        return f"{label}: —"
    ratio = statistics.median(value(s) for s in a) / statistics.median(value(s) for s in b)
    return f"{label}: {ratio:.3f}"


def _retention_report(plan: Plan, total: int, fill_s: float, phases: Phases,
                      done: list[tuple[bytes, bytes]], vacuum: list[tuple[object, ...]]) -> str:  # fmt: skip
    tp, lc = plan.throughput_concurrency, plan.latency_concurrency
    lines = [
        f"## Operations 2. Enqueue while retention deletes {total:,} expired tasks "
        f"({plan.throughput_duration:g}s @{tp}, {plan.latency_duration:g}s @{lc} per measurement)",
        "",
        f"filled in {fill_s:.0f}s; they expire {EXPIRE_AFTER:g}s after the gateway starts, its next "
        f"retention pass ({RETENTION_INTERVAL:g}s after the first) deletes them.",
    ]
    for deleted, seconds in done:
        rate = int(deleted) / max(float(seconds), 1e-9)
        lines.append(
            f"the gateway logged: {int(deleted):,} tasks deleted in {float(seconds):.1f}s ({rate:,.0f}/s)"
        )
    if not done:
        lines.append("the gateway logged no finished retention pass (timed out?)")
    lines += [
        "",
        f"{'phase':<12} {'n tp/lat':>7} {'calls/s @' + str(tp) + ' (min-max)':>22} "
        f"{'p99@' + str(tp) + ' ms':>11} {'p50@' + str(lc) + ' ms':>11} {'p99@' + str(lc) + ' ms':>11} "
        f"{'PG ms/call':>10} {'stall ms':>9}",
    ]
    for phase in ("before", "during", "after", "straddling"):
        tps, lats = phases.throughput.get(phase, []), phases.latencies.get(phase, [])
        if tps or lats:
            lines.append(_phase_line(phase, tps, lats, phases.stalls.get(phase)))
    t, lat = phases.throughput, phases.latencies
    idle_t = t.get("before", []) + t.get("after", [])
    idle_l = lat.get("before", []) + lat.get("after", [])
    during_t, during_l = t.get("during", []), lat.get("during", [])
    lines += [
        "",
        "PG ms/call: CPU of the database's backends per Enqueue (the deletion's included);",
        "stall ms: the deleting gateway's worst event-loop stall in the phase, counting only the time its\n"
        "loop thread was running (loopwatch's busy_max: not the machine's other processes).",
        f"autovacuum runs on tasks by the end: {vacuum[0][0] if vacuum else '?'}, "
        f"dead tuples left: {vacuum[0][1] if vacuum else '?'}",
        "",
        _ratio_line("Enqueue/s during / after", during_t, t.get("after", []), lambda s: s.result.rate),
        _ratio_line("Enqueue/s during / before", during_t, t.get("before", []), lambda s: s.result.rate),
        _ratio_line(f"p99 @{lc} during / after", during_l, lat.get("after", []), lambda s: s.result.p99),
        _ratio_line(f"p99 @{lc} during / before", during_l, lat.get("before", []), lambda s: s.result.p99),
    ]
    if during_t and idle_t:
        ratio = statistics.median(s.result.rate for s in during_t) / statistics.median(
            s.result.rate for s in idle_t
        )
        lines.append(
            f"Enqueue/s during / not deleting (before and after): {ratio:.3f}  "
            f"target ≥ 0.9: {'MET' if ratio >= 0.9 else 'NOT MET'}"
        )
    if during_l and idle_l:
        ratio = statistics.median(s.result.p99 for s in during_l) / statistics.median(
            s.result.p99 for s in idle_l
        )
        lines.append(f"p99 @{lc} during / not deleting: {ratio:.3f}")
    return "\n".join(lines)
