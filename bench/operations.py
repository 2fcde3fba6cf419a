"""Operations section: what metrics, tracing and retention cost Enqueue (issue: operators).

**Metrics and tracing.** Three gateways on the same database and Redis: everything off
(``TASKGATE_METRICS_LISTEN`` empty, ``OTEL_TRACES_EXPORTER=none``), metrics on (a
``/metrics`` port), tracing on (OTLP over HTTP to a sink in this process that answers every
export with 200 and counts the spans). Rounds alternate the order (ABC, CBA, …) so a slow
phase of the shared machine hits all three; each round gives a ratio on/off, and the report
has the median ratio with its spread over rounds. Target: metrics on ≥ 0.95 of off.

**Retention.** A database of its own is filled with ``plan.list_large`` finished tasks, all
of them expiring a few seconds after one gateway (``TASKGATE_RETENTION`` set to match)
has started: its first retention pass finds nothing, the next one (``RETENTION_INTERVAL``
later) deletes them all, batch by batch. Enqueue is measured without a pause from start to
the end; each measurement is classified by the expired rows left before and after it —
*before* (none deleted yet), *during* (deletion under way from its start to its end),
*after* (none left), or straddling (left out). Target: during ≥ 0.9 of before and after.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.enqueue import Sample, System, grpc_command, measure
from bench.infra import Children, PrivateDatabase, PrivateRedis, announce, python_env
from bench.plan import Plan
from bench.servers import Server, start_taskgate
from service.usecases.operations import RETENTION_INTERVAL

#: Every gateway here: the lost-message pass off (the bench drains the broker between runs,
#: and republishing those tasks would be load of its own in some rounds and not others).
_QUIET = {"TASKGATE_LOST_QUEUED_AFTER": "1000000000"}
_OFF = {"TASKGATE_METRICS_LISTEN": "", "OTEL_TRACES_EXPORTER": "none", **_QUIET}
_METRICS_PORT = re.compile(rb"metrics on http://[^:\s]+:(\d+)/metrics")
_RETENTION_DONE = re.compile(rb"retention: deleted (\d+) tasks finished before \S+ in ([\d.]+)s")
#: Seconds after the gateway is launched at which the filled rows expire.
EXPIRE_AFTER = 10.0
#: Give up on the retention measurement after this many seconds of measuring.
RETENTION_TIMEOUT = 1200.0


# --- metrics and tracing ----------------------------------------------------------------


class OtlpSink:
    """An OTLP/HTTP trace receiver on a free port: 200 to every export, spans counted."""

    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                sink.exports += 1
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _scrape_enqueues(port: int) -> int:
    """``grpc_server_handled_total`` of Enqueue with code OK, from the gateway's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        labels = 'grpc_method="Enqueue"' in line and 'grpc_code="OK"' in line
        if line.startswith("grpc_server_handled_total{") and labels:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _wait_metrics_port(server: Server, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := _METRICS_PORT.search(server.log.read_bytes()):
            return int(match.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"the metrics gateway logged no metrics port; see {server.log}")


def _round_ratios(on: list[Sample], off: list[Sample], value: Callable[[Sample], float]) -> list[float]:
    return [value(a) / value(b) for a, b in zip(on, off, strict=True) if value(b) > 0]


def _spread(values: list[float], spec: str = ".3f") -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def _telemetry_rounds(plan: Plan, children: Children, redis: PrivateRedis, systems: list[System]) -> int:
    rounds = max(4, 2 * plan.rounds)
    for round_no in range(1, rounds + 1):
        order = systems if round_no % 2 else systems[::-1]
        for system in order:
            announce(f"operations round {round_no}/{rounds}: {system.key} @{plan.throughput_concurrency}")
            system.throughput.append(
                measure(children, redis, system, plan.throughput_concurrency, plan.warmup,
                        plan.throughput_duration)
            )  # fmt: skip
        for system in order:
            announce(f"operations round {round_no}/{rounds}: {system.key} @{plan.latency_concurrency}")
            system.latencies.append(
                measure(children, redis, system, plan.latency_concurrency, plan.warmup, plan.latency_duration)
            )
    return rounds


def _telemetry_cost(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    sink = OtlpSink()
    servers: list[Server] = []
    try:
        announce("operations: starting gateways with metrics off, metrics on, tracing on")
        off = start_taskgate(children, redis.url, db.url, log_name="taskgate-ops-off.log", **_OFF)
        servers.append(off)
        metrics = start_taskgate(
            children, redis.url, db.url, log_name="taskgate-ops-metrics.log",
            **{**_OFF, "TASKGATE_METRICS_LISTEN": "127.0.0.1:0"},
        )  # fmt: skip
        servers.append(metrics)
        metrics_port = _wait_metrics_port(metrics)
        tracing = start_taskgate(
            children, redis.url, db.url, log_name="taskgate-ops-tracing.log",
            **{**_OFF, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "taskgate-bench"},
        )  # fmt: skip
        servers.append(tracing)
        env = python_env()
        systems = [
            System("off", "metrics off, tracing off", off, grpc_command(off, plan.channels), env),
            System("metrics", "metrics on (/metrics)", metrics, grpc_command(metrics, plan.channels), env),
            System("tracing", "tracing on (OTLP/HTTP)", tracing, grpc_command(tracing, plan.channels), env),
        ]
        rounds = _telemetry_rounds(plan, children, redis, systems)
        counted = _scrape_enqueues(metrics_port)
        time.sleep(6)  # the batch span processor exports every 5 s
    finally:
        for server in servers:
            children.stop(server.process)
        sink.close()
    return _telemetry_report(plan, systems, rounds, counted, sink)


def _telemetry_report(plan: Plan, systems: list[System], rounds: int, counted: int, sink: OtlpSink) -> str:
    tp, lc = plan.throughput_concurrency, plan.latency_concurrency
    lines = [
        f"## Operations 1. Cost of metrics and tracing — Enqueue demo.add, {rounds} rounds "
        f"alternating the order ({plan.throughput_duration:g}s @{tp}, {plan.latency_duration:g}s @{lc})",
        "",
        f"{'gateway':<28} {'calls/s @' + str(tp):>24} {'p99 @' + str(tp) + ' ms':>12} "
        f"{'p50 @' + str(lc) + ' ms':>12} {'p99 @' + str(lc) + ' ms':>12} {'srv ms/call':>12} {'errors':>6}",
    ]
    for s in systems:
        rates = [x.result.rate for x in s.throughput]
        cpu = [x.server_ms for x in s.throughput if x.server_ms is not None]
        errors = sum(x.result.errors for x in s.throughput + s.latencies)
        lines.append(
            f"{s.label:<28} {_spread(rates, '.0f'):>24} "
            f"{statistics.median(x.result.p99 for x in s.throughput):>12.2f} "
            f"{statistics.median(x.result.p50 for x in s.latencies):>12.2f} "
            f"{statistics.median(x.result.p99 for x in s.latencies):>12.2f} "
            f"{(statistics.median(cpu) if cpu else float('nan')):>12.3f} {errors:>6}"
        )
    off = systems[0]
    lines += ["", "per-round ratio to off: median (min-max over rounds)", ""]
    lines.append(f"{'':<14} {'calls/s @' + str(tp):>22} {'p99 @' + str(lc):>22} {'srv ms/call':>22}")
    verdicts = []
    for on in systems[1:]:
        rate = _round_ratios(on.throughput, off.throughput, lambda x: x.result.rate)
        p99 = _round_ratios(on.latencies, off.latencies, lambda x: x.result.p99)
        cpu = _round_ratios(on.throughput, off.throughput, lambda x: x.server_ms or 0.0)
        lines.append(f"{on.key + ' / off':<14} {_spread(rate):>22} {_spread(p99):>22} {_spread(cpu):>22}")
        if rate:
            verdicts.append((on.key, statistics.median(rate)))
    calls = sum(x.result.total_calls for x in systems[1].throughput + systems[1].latencies)
    lines += [
        "",
        f"sanity: the metrics gateway's grpc_server_handled_total{{Enqueue, OK}} = {counted:,} "
        f"(load generators counted {calls:,} completed calls, warm-up included);",
        f"the OTLP sink received {sink.spans:,} spans in {sink.exports:,} exports from the tracing gateway.",
        "",
    ]
    for key, ratio in verdicts:
        bound = 0.95 if key == "metrics" else None
        verdict = "" if bound is None else f"  target ≥ {bound}: {'MET' if ratio >= bound else 'NOT MET'}"
        lines.append(f"Enqueue/s {key} on / off: {ratio:.3f}{verdict}")
    return "\n".join(lines)


# --- retention ----------------------------------------------------------------------------

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
                worst = system.stalls[-1].max_ms
                phases.stalls[phase] = max(phases.stalls.get(phase, 0.0), worst)
        if len(phases.latencies.get("after", [])) >= plan.rounds:
            break
    return phases


def _retention_cost(plan: Plan, children: Children, redis: PrivateRedis) -> str:
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
            **{**_OFF, "TASKGATE_RETENTION": f"{retention:.3f}"},
        )  # fmt: skip
        system = System("retention", "retention gateway", server, grpc_command(server, plan.channels),
                        python_env(), pg=own, stalls_watched=True)  # fmt: skip
        phases = _measure_phases(plan, children, redis, system, own.url, total)
        vacuum = asyncio.run(_execute(own.url, (_VACUUM, {})))
        done = _RETENTION_DONE.findall(server.log.read_bytes())
    finally:
        if server is not None:
            children.stop(server.process)
        own.drop()
    return _retention_report(plan, total, fill_s, phases, done, vacuum)


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
        "stall ms: the deleting gateway's worst event-loop stall in the phase (loopwatch).",
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


def run_operations(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Section: Enqueue with metrics and tracing on against off, and while retention deletes."""
    sections = [_telemetry_cost(plan, children, redis, db)]
    print(sections[-1] + "\n", flush=True)
    redis.drain_broker()
    sections.append(_retention_cost(plan, children, redis))
    return "\n\n".join(sections)
