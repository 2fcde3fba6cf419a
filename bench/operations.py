"""Operations section: what metrics, tracing and retention cost Enqueue (issue: operators).

**Metrics and tracing.** Three gateways on the same database and Redis: everything off
(``TASKGATE_METRICS_LISTEN`` empty, ``OTEL_TRACES_EXPORTER=none``), metrics on (a
``/metrics`` port), tracing on (OTLP over HTTP to a sink in this process that answers every
export with 200 and counts the spans). Rounds alternate the order (ABC, CBA, …) so a slow
phase of the shared machine hits all three; each round gives a ratio on/off, and the report
has the median ratio with its spread over rounds. Target: metrics on ≥ 0.95 of off.

On a busy machine the rounds spread by more than the 5% they should resolve, so the
section also times the hooks themselves in this process (``bench/hookcost.py``): the CPU
one Enqueue's metrics, and one Enqueue's span, cost, against the gateway's CPU per call.

**Retention.** ``bench/retention.py``: Enqueue before, during and after the deletion of
``plan.list_large`` expired tasks, on a database of its own.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from bench.enqueue import Sample, System, grpc_command, measure
from bench.hookcost import HookCosts, hook_costs
from bench.infra import Children, PrivateDatabase, PrivateRedis, announce, python_env
from bench.plan import Plan
from bench.retention import run_retention
from bench.servers import Server, start_taskgate

#: Every gateway here: metrics and tracing off unless a gateway turns one on (the lost-message
#: pass is off in every bench gateway, ``start_taskgate``).
_OFF = {"TASKGATE_METRICS_LISTEN": "", "OTEL_TRACES_EXPORTER": "none"}
_METRICS_PORT = re.compile(rb"metrics on http://[^:\s]+:(\d+)/metrics")


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
        hooks = hook_costs()
        counted = _scrape_enqueues(metrics_port)
        time.sleep(6)  # the batch span processor exports every 5 s
    finally:
        for server in servers:
            children.stop(server.process)
        sink.close()
    return _telemetry_report(plan, systems, rounds, counted, sink, hooks)


def _telemetry_report(
    plan: Plan, systems: list[System], rounds: int, counted: int, sink: OtlpSink, hooks: HookCosts
) -> str:
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
    off_cpu = [x.server_ms for x in off.throughput if x.server_ms is not None]
    if off_cpu:
        call_us = statistics.median(off_cpu) * 1000
        lines += [
            f"hooks timed in this process ({hooks.calls:,} calls each; bench/hookcost.py): metrics "
            f"{hooks.metrics_us:.1f} µs per Enqueue, tracing {hooks.tracing_us:.1f} µs per Enqueue",
            f"(span, context, headers, batch export encoding) against {call_us:.0f} µs of gateway CPU "
            f"per Enqueue with both off:",
            f"metrics add {hooks.metrics_us / call_us:.1%} CPU per call, tracing "
            f"{hooks.tracing_us / call_us:.1%} (a CPU-bound gateway loses as much throughput).",
            "",
        ]
        verdicts.append(("metrics (hook CPU)", 1 / (1 + hooks.metrics_us / call_us)))
    for key, ratio in verdicts:
        bound = 0.95 if key.startswith("metrics") else None
        verdict = "" if bound is None else f"  target ≥ {bound}: {'MET' if ratio >= bound else 'NOT MET'}"
        lines.append(f"Enqueue/s {key} on / off: {ratio:.3f}{verdict}")
    return "\n".join(lines)


def run_operations(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Section: Enqueue with metrics and tracing on against off, and while retention deletes."""
    sections = [_telemetry_cost(plan, children, redis, db)]
    print(sections[-1] + "\n", flush=True)  # the retention part takes minutes
    redis.drain_broker()
    sections.append(run_retention(plan, children, redis))
    return "\n\n".join(sections)
