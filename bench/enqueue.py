"""Measurements 1 and 2: enqueue throughput and latency, taskgate against the alternatives.

Rounds alternate the systems (taskgate, naive, raw Celery, Flower, then again) so slow
phases of a noisy machine hit them all alike; the report gives medians over rounds.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from bench.drive import LoadResult
from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, cpu_seconds, python_env
from bench.nodejs import node_command
from bench.plan import Plan
from bench.servers import Server, broker_env
from bench.stalls import Stalls, stall_report


@dataclass
class Sample:
    """One run of one system: the load result and the CPU the serving side used per call."""

    result: LoadResult
    server_ms: float | None
    pg_ms: float | None
    redis_ms: float


@dataclass
class System:
    """One contender: how to run a load generator against it."""

    key: str
    label: str
    server: Server | None
    command: Callable[[int, float, float], list[str]]
    env: dict[str, str]
    pg: PrivateDatabase | None = None
    latency: bool = True
    #: read the server's event-loop stall statistics around each run (taskgate only)
    stalls_watched: bool = False
    stalls: list[Stalls] = field(default_factory=list)
    throughput: list[Sample] = field(default_factory=list)
    latencies: list[Sample] = field(default_factory=list)


def grpc_command(server: Server, channels: int) -> Callable[[int, float, float], list[str]]:
    """The gRPC load generator in Node (``bench/node/loadgen.js``, @grpc/grpc-js). The same
    gateway costs less CPU per call from it than from grpc.aio's client (``python -m
    bench.loadgen``, run beside it as system (e), and by the batch and scale-out sections)."""

    def command(concurrency: int, warmup: float, duration: float) -> list[str]:
        return node_command(
            "loadgen.js", "--target", server.target, "--concurrency", str(concurrency),
            "--warmup", str(warmup), "--duration", str(duration), "--channels", str(channels),
        )  # fmt: skip

    return command


def python_grpc_command(server: Server, channels: int) -> Callable[[int, float, float], list[str]]:
    """The gRPC load generator in Python (``python -m bench.loadgen``, grpc.aio)."""

    def command(concurrency: int, warmup: float, duration: float) -> list[str]:
        return [
            sys.executable, "-m", "bench.loadgen", "--target", server.target, "--method", "enqueue",
            "--concurrency", str(concurrency), "--warmup", str(warmup), "--duration", str(duration),
            "--channels", str(channels),
        ]  # fmt: skip

    return command


def http_command(server: Server) -> Callable[[int, float, float], list[str]]:
    def command(concurrency: int, warmup: float, duration: float) -> list[str]:
        return [
            sys.executable, "-m", "bench.httpload", "--port", str(server.port),
            "--concurrency", str(concurrency), "--warmup", str(warmup), "--duration", str(duration),
        ]  # fmt: skip

    return command


def raw_command(concurrency: int, warmup: float, duration: float) -> list[str]:
    return [sys.executable, "-m", "bench.rawsend", "--warmup", str(warmup), "--duration", str(duration)]


def contenders(
    plan: Plan, redis: PrivateRedis, db: PrivateDatabase, taskgate: Server, naive: Server, flower: Server
) -> list[System]:
    client_env = python_env()
    return [
        System("taskgate", "(a) taskgate (durable)", taskgate, grpc_command(taskgate, plan.channels),
               client_env, pg=db, stalls_watched=True),
        System("naive", "(b) naive gateway", naive, grpc_command(naive, plan.channels), client_env),
        System("raw", "(c) raw send_task, 1 thread", None, raw_command, broker_env(redis.url), latency=False),
        System("flower", "(d) Flower async-apply", flower, http_command(flower), client_env),
        System("taskgate-py", "(e) (a), grpc.aio load generator", taskgate,
               python_grpc_command(taskgate, plan.channels), client_env, pg=db, latency=False),
    ]  # fmt: skip


def _pg_cpu(db: PrivateDatabase | None) -> dict[int, float]:
    return db.backend_cpu() if db is not None else {}


def measure(
    children: Children, redis: PrivateRedis, system: System, concurrency: int, warmup: float, duration: float
) -> Sample:
    """One load-generator run against ``system``, with the CPU its serving side spent."""
    redis.drain_broker()
    if system.stalls_watched and system.server is not None:
        stall_report(system.server)  # starts a new window
    server_before = cpu_seconds(system.server.pid) if system.server else 0.0
    pg_before = _pg_cpu(system.pg)
    redis_before = cpu_seconds(redis.process.pid)
    line = children.run_json_line(
        system.command(concurrency, warmup, duration),
        log=OUT / f"loadgen-{system.key}.log",
        env=system.env,
        timeout=warmup + duration + 90,
    )
    result = LoadResult.from_json(line)
    calls = max(result.total_calls, 1)
    redis_ms = (cpu_seconds(redis.process.pid) - redis_before) * 1000 / calls
    pg_ms: float | None = None
    if system.pg is not None:
        pg_after = _pg_cpu(system.pg)
        pg_ms = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items()) * 1000 / calls
    if system.server is not None:
        server_ms: float | None = (cpu_seconds(system.server.pid) - server_before) * 1000 / calls
    else:  # raw send_task: the sender is the whole cost
        server_ms = result.client_cpu * result.elapsed * 1000 / max(result.completed, 1)
    if result.errors:
        announce(f"{system.key}: {result.errors} errors, first: {result.first_error}")
    if system.stalls_watched and system.server is not None and (stalls := stall_report(system.server)):
        system.stalls.append(stalls)
    return Sample(result, server_ms, pg_ms, redis_ms)


def run_rounds(plan: Plan, children: Children, redis: PrivateRedis, systems: list[System]) -> None:
    """Alternate the systems round by round: throughput at 64 in flight, then latency at 16."""
    for round_no in range(1, plan.rounds + 1):
        for system in systems:
            announce(
                f"round {round_no}/{plan.rounds}: {system.key} throughput @{plan.throughput_concurrency}"
            )
            sample = measure(
                children, redis, system, plan.throughput_concurrency, plan.warmup, plan.throughput_duration
            )
            system.throughput.append(sample)
        for system in systems:
            if not system.latency:
                continue
            announce(f"round {round_no}/{plan.rounds}: {system.key} latency @{plan.latency_concurrency}")
            sample = measure(
                children, redis, system, plan.latency_concurrency, plan.warmup, plan.latency_duration
            )
            system.latencies.append(sample)


def samples_json(systems: list[System]) -> str:
    """Every sample of every round, for later comparison."""
    data = {
        system.key: {
            "throughput": [asdict(sample) for sample in system.throughput],
            "latency": [asdict(sample) for sample in system.latencies],
        }
        for system in systems
    }
    return json.dumps(data, indent=1)


# --- report ----------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


@dataclass
class Summary:
    """Medians over rounds for one system."""

    rate: float
    rate_min: float
    rate_max: float
    p50: float | None
    p99: float | None
    p50_64: float | None
    p99_64: float | None
    server_ms: float | None
    pg_ms: float | None
    redis_ms: float | None
    client_cores: float
    errors: int
    #: latency of one call with nothing else in flight (only meaningful for raw send_task)
    single_p50: float


def summarize(system: System) -> Summary:
    rates = [s.result.rate for s in system.throughput]
    return Summary(
        rate=statistics.median(rates),
        rate_min=min(rates),
        rate_max=max(rates),
        p50=_median([s.result.p50 for s in system.latencies]),
        p99=_median([s.result.p99 for s in system.latencies]),
        p50_64=statistics.median(s.result.p50 for s in system.throughput) if system.latency else None,
        p99_64=statistics.median(s.result.p99 for s in system.throughput) if system.latency else None,
        single_p50=statistics.median(s.result.p50 for s in system.throughput),
        server_ms=_median([s.server_ms for s in system.throughput]),
        pg_ms=_median([s.pg_ms for s in system.throughput]),
        redis_ms=_median([s.redis_ms for s in system.throughput]),
        client_cores=statistics.median(s.result.client_cpu for s in system.throughput),
        errors=sum(s.result.errors for s in system.throughput + system.latencies),
    )


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def _max_stall(system: System, *, busy: bool = False) -> float | None:
    return max((s.busy_max_ms if busy else s.max_ms for s in system.stalls), default=None)


def _quotient(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _verdict(value: float | None, bound: float, higher: bool) -> str:
    if value is None:
        return "not measured"
    return "MET" if (value >= bound if higher else value <= bound) else "NOT MET"


def report(plan: Plan, systems: list[System]) -> str:
    """The throughput/latency table, the ratios and the outbox cost."""
    tp, lc = plan.throughput_concurrency, plan.latency_concurrency
    summaries = {system.key: summarize(system) for system in systems}
    lines = [
        f"## 1. Enqueue demo.add — medians of {plan.rounds} alternating rounds "
        f"({plan.throughput_duration:g}s @{tp} in flight, {plan.latency_duration:g}s @{lc} in flight)",
        "",
        f"{'system':<30} {'calls/s @' + str(tp):>12} {'(min-max)':>13} {'p50 @' + str(lc):>9} "
        f"{'p99 @' + str(lc):>9} {'p50 @' + str(tp):>9} {'p99 @' + str(tp):>9} "
        f"{'srv CPU':>8} {'PG CPU':>7} {'redis':>6} {'client':>7} {'errors':>6}",
        f"{'':<30} {'':>12} {'':>13} {'ms':>9} {'ms':>9} {'ms':>9} {'ms':>9} "
        f"{'ms/call':>8} {'ms/call':>7} {'ms/call':>6} {'cores':>7} {'':>6}",
    ]
    for system in systems:
        s = summaries[system.key]
        lines.append(
            f"{system.label:<30} {s.rate:>12.0f} {f'{s.rate_min:.0f}-{s.rate_max:.0f}':>13} "
            f"{_fmt(s.p50, '.2f'):>9} {_fmt(s.p99, '.2f'):>9} "
            f"{_fmt(s.p50_64, '.2f'):>9} {_fmt(s.p99_64, '.2f'):>9} "
            f"{_fmt(s.server_ms, '.3f'):>8} {_fmt(s.pg_ms, '.3f'):>7} {_fmt(s.redis_ms, '.3f'):>6} "
            f"{s.client_cores:>7.2f} {s.errors:>6}"
        )
    lines += [
        "",
        "srv CPU = CPU of the serving process per call (for (c): of the sending process); PG CPU = the",
        "PostgreSQL backends of the bench database; redis = the private redis-server; client = cores the",
        "load generator used (near 1.0 means the client, not the server, may be the limit).",
        f"(c) has 1 call in flight by design: one send_task takes p50 {summaries['raw'].single_p50:.2f} ms.",
        "(a) and (b) are driven by a Node load generator (bench/node/loadgen.js, @grpc/grpc-js), (d) by",
        "an HTTP one in Python; (e) is the gateway of (a) driven by Python's grpc.aio client",
        "(bench/loadgen.py), throughput only: its callers cost the gateway more CPU per call.",
        "",
    ]
    tg, naive, flower = summaries["taskgate"], summaries["naive"], summaries["flower"]
    lines += [
        f"{'ratio':<22} {'calls/s':>9} {'p50 @' + str(lc):>9} {'p99 @' + str(lc):>9}",
        f"{'taskgate / Flower':<22} {_ratio(tg.rate, flower.rate):>9} {_ratio(tg.p50, flower.p50):>9} "
        f"{_ratio(tg.p99, flower.p99):>9}",
        f"{'taskgate / naive':<22} {_ratio(tg.rate, naive.rate):>9} {_ratio(tg.p50, naive.p50):>9} "
        f"{_ratio(tg.p99, naive.p99):>9}",
    ]
    if (tg_py := summaries.get("taskgate-py")) is not None:
        lines.append(f"{'(e) / Flower':<22} {_ratio(tg_py.rate, flower.rate):>9}   (reported, not a target)")
    lines += [
        "",
        "## 2. Cost of the outbox against publishing directly — (a) taskgate vs (b) naive gateway",
        "",
        "(a) validates the call against the catalog, commits a PostgreSQL row + outbox mark before",
        "answering (concurrent calls share one INSERT), then LPUSHes the Celery messages in batches",
        "and marks the rows published; it logs one audit line per call. (b) only converts the",
        "arguments and calls send_task on a thread.",
        "",
        f"throughput             : {tg.rate:.0f} vs {naive.rate:.0f} calls/s "
        f"-> {_ratio(tg.rate, naive.rate)}",
    ]
    if tg.p50 is not None and naive.p50 is not None and tg.p99 is not None and naive.p99 is not None:
        lines.append(
            f"added latency @{lc:<8}: p50 {tg.p50 - naive.p50:+.2f} ms, p99 {tg.p99 - naive.p99:+.2f} ms "
            f"(x{tg.p50 / naive.p50:.2f} / x{tg.p99 / naive.p99:.2f})"
        )
    if tg.server_ms is not None and naive.server_ms is not None:
        pg = tg.pg_ms or 0.0
        lines.append(
            f"CPU per call           : gateway {tg.server_ms:.3f} vs {naive.server_ms:.3f} ms "
            f"({tg.server_ms - naive.server_ms:+.3f} ms), plus {pg:.3f} ms in PostgreSQL backends"
        )
    if systems[0].stalls:
        worst = max(systems[0].stalls, key=lambda s: s.max_ms)
        lines += [
            "",
            f"taskgate event-loop stalls, worst of its {len(systems[0].stalls)} runs: {worst.text()}",
            "(how late a 5 ms timer fires in the gateway: service/runtime/loopwatch.py, read with SIGUSR1)",
        ]
    lines += ["", "## Targets (issue: fast), from the medians above", ""]
    for label, value, target, ambition, higher in (
        ("Enqueue/s, taskgate / Flower", _quotient(tg.rate, flower.rate), 3.0, 5.0, True),
        ("Enqueue/s, taskgate / naive", _quotient(tg.rate, naive.rate), 1.5, 2.0, True),
        (f"taskgate p99 @{lc} (ms)", tg.p99, 25.0, 10.0, False),
        ("taskgate max loop stall (ms)", _max_stall(systems[0]), 20.0, 20.0, False),
        ("  of which its own running (ms)", _max_stall(systems[0], busy=True), 20.0, 20.0, False),
    ):
        lines.append(
            f"{label:<32} {_fmt(value, '.2f'):>8}  target {'≥' if higher else '≤'} {target:g}: "
            f"{_verdict(value, target, higher)}; ambition {ambition:g}: {_verdict(value, ambition, higher)}"
        )
    return "\n".join(lines)
