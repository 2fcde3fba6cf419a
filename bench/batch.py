"""EnqueueBatch: durable tasks per second in batches, against raw ``send_task`` in the same run.

Rounds alternate taskgate's EnqueueBatch (``plan.batch_size`` tasks per call, a few calls in
flight) with raw ``send_task`` from one thread. For taskgate it reports the rate of tasks
acknowledged (each one committed to PostgreSQL before its batch returns) and, separately,
how long after the last acknowledgment the broker held every one of them (the outbox's
lag), so a publisher that falls behind cannot hide behind a fast INSERT.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

from bench.drive import LoadResult
from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, cpu_seconds, python_env
from bench.plan import Plan
from bench.servers import Server, broker_env, start_taskgate
from bench.stalls import Stalls, stall_report

#: Target of the issue: durable tasks per second in batches of 500.
TARGET_TASKS_PER_SECOND = 20_000


@dataclass
class BatchSample:
    """One round of EnqueueBatch load."""

    tasks_per_second: float
    p50_ms: float
    p99_ms: float
    tasks: int
    #: seconds from the end of the load until the broker held every acknowledged task
    publish_lag: float
    #: tasks per second through to the broker (acknowledged tasks / (load + lag))
    published_per_second: float
    server_cpu_us_per_task: float
    stalls: Stalls | None


def _batch_round(plan: Plan, children: Children, redis: PrivateRedis, server: Server) -> BatchSample:
    redis.drain_broker()
    target, pid = server.target, server.pid
    stall_report(server)  # starts a new window
    command = [
        sys.executable, "-m", "bench.loadgen", "--target", target, "--method", "batch",
        "--batch-size", str(plan.batch_size), "--concurrency", str(plan.batch_concurrency),
        "--warmup", "0", "--duration", str(plan.throughput_duration), "--channels", "1",
    ]  # fmt: skip
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    line = children.run_json_line(
        command, log=OUT / "loadgen-batch.log", env=python_env(), timeout=plan.throughput_duration + 90
    )
    load_end = time.monotonic()
    result = LoadResult.from_json(line)
    if result.errors:
        raise RuntimeError(f"EnqueueBatch failed {result.errors} time(s): {result.first_error}")
    tasks = result.total_calls * plan.batch_size
    deadline = load_end + 120
    while redis.queue_length() < tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    published_at = time.monotonic()
    queued = redis.queue_length()
    if queued < tasks:
        raise RuntimeError(f"only {queued} of {tasks} acknowledged tasks reached the broker in 120 s")
    cpu = cpu_seconds(pid) - cpu_before
    return BatchSample(
        tasks_per_second=result.rate * plan.batch_size,
        p50_ms=result.p50,
        p99_ms=result.p99,
        tasks=tasks,
        publish_lag=published_at - load_end,
        published_per_second=tasks / (published_at - started),
        server_cpu_us_per_task=cpu / max(tasks, 1) * 1e6,
        stalls=stall_report(server),
    )


def _raw_round(plan: Plan, children: Children, redis: PrivateRedis) -> float:
    redis.drain_broker()
    command = [
        sys.executable,
        "-m",
        "bench.rawsend",
        "--warmup",
        "0.5",
        "--duration",
        str(plan.throughput_duration),
    ]
    line = children.run_json_line(
        command,
        log=OUT / "rawsend-batch.log",
        env=broker_env(redis.url),
        timeout=plan.throughput_duration + 60,
    )
    return LoadResult.from_json(line).rate


def run_batch(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Measure EnqueueBatch on a gateway of its own; return the report section."""
    server = start_taskgate(children, redis.url, db.url, log_name="taskgate-batch.log")
    samples: list[BatchSample] = []
    raw: list[float] = []
    try:
        for round_no in range(1, plan.rounds + 1):
            announce(
                f"round {round_no}/{plan.rounds}: EnqueueBatch x{plan.batch_size} @{plan.batch_concurrency}"
            )
            samples.append(_batch_round(plan, children, redis, server))
            announce(f"round {round_no}/{plan.rounds}: raw send_task")
            raw.append(_raw_round(plan, children, redis))
    finally:
        children.stop(server.process)
        redis.drain_broker()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    rate = med([s.tasks_per_second for s in samples])
    raw_rate = med(raw)
    lines = [
        f"## EnqueueBatch — {plan.batch_size} demo.add tasks per call, {plan.batch_concurrency} calls in "
        f"flight, medians of {plan.rounds} alternating rounds",
        "",
        "| | tasks/s | p50 / p99 per call (ms) | lag to broker after the load (s) | tasks/s to broker "
        "| gateway CPU per task (µs) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| taskgate EnqueueBatch (durable) | {rate:,.0f} | {med([s.p50_ms for s in samples]):.1f} / "
        f"{med([s.p99_ms for s in samples]):.1f} | {med([s.publish_lag for s in samples]):.2f} | "
        f"{med([s.published_per_second for s in samples]):,.0f} | "
        f"{med([s.server_cpu_us_per_task for s in samples]):.0f} |",
        f"| raw send_task, 1 thread (not durable) | {raw_rate:,.0f} | | | {raw_rate:,.0f} | |",
        "",
        f"EnqueueBatch / raw send_task: {rate / raw_rate:.1f}x. Target ≥ {TARGET_TASKS_PER_SECOND:,} durable "
        f"tasks/s: {'MET' if rate >= TARGET_TASKS_PER_SECOND else 'NOT MET'} ({rate:,.0f}).",
        "Every round waits until the broker holds every acknowledged task (LLEN), so the "
        "'to broker' rate includes the outbox publishing them.",
    ]
    stalls = [s.stalls for s in samples if s.stalls is not None]
    if stalls:
        worst = max(stalls, key=lambda s: s.max_ms)
        lines.append(
            f"Gateway event-loop stalls, worst round: {worst.text()} — target max ≤ 20 ms: "
            f"{'MET' if worst.max_ms <= 20 else 'NOT MET'} (counting only the loop's own running: "
            f"{'MET' if worst.busy_max_ms <= 20 else 'NOT MET'})."
        )
    return "\n".join(lines)
