"""RabbitMQ: Enqueue through taskgate against Flower's async-apply on the same broker, and EnqueueBatch.

Both servers publish to a private vhost on the local RabbitMQ (``rabbitmqctl add_vhost``,
deleted at the end; ``TASKGATE_BENCH_AMQP`` names the node, default
``amqp://guest:guest@127.0.0.1:5672``); the result backend stays the private Redis. No
worker consumes: the ``celery`` queue is purged between runs. Enqueue rounds alternate the
two systems, as section 1 does on Redis; EnqueueBatch rounds wait until RabbitMQ holds every
acknowledged task (its queue depth), so a publisher that falls behind its confirms cannot
hide behind a fast INSERT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import aio_pika

from bench.drive import LoadResult
from bench.enqueue import Sample, System, grpc_command, http_command, measure
from bench.flower import start_flower_env
from bench.infra import (
    OUT,
    Children,
    PrivateDatabase,
    PrivateRedis,
    announce,
    cpu_seconds,
    python_env,
    wait_for_line,
)
from bench.plan import Plan
from bench.servers import Server

AMQP_BASE = os.environ.get("TASKGATE_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672")
#: Targets of the issue on RabbitMQ.
TARGET_FLOWER_RATIO = 3.0
TARGET_BATCH_PER_SECOND = 10_000
QUEUE = "celery"
_LISTENING = re.compile(rb"taskgate listening on [^:\s]+:(\d+)")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


class PrivateVhost:
    """A RabbitMQ vhost of our own (guest may use it); ``close()`` deletes it.

    Queue depths are read on one connection kept open between reads (a connection per
    read would load the node this measures), on an event loop of its own.
    """

    def __init__(self) -> None:
        self.name = f"tgbench-{uuid.uuid4().hex[:8]}"
        _rabbitmqctl("add_vhost", self.name)
        _rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        self.url = f"{AMQP_BASE}/{self.name}"
        self._loop = asyncio.new_event_loop()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    def depth(self) -> int:
        """Messages in the ``celery`` queue (0 before anyone declared it)."""
        return self._run(purge=False)

    def purge(self) -> None:
        """Drop the piled-up task messages (nobody consumes them)."""
        self._run(purge=True)

    def _run(self, *, purge: bool) -> int:
        try:
            return self._loop.run_until_complete(self._queue_op(purge=purge))
        except (aio_pika.exceptions.AMQPError, OSError):  # idle too long: a new connection
            self._connection = None
            return self._loop.run_until_complete(self._queue_op(purge=purge))

    async def _queue_op(self, *, purge: bool) -> int:
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self.url, timeout=10)
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(QUEUE, passive=True)
        except aio_pika.exceptions.ChannelClosed:  # not declared yet
            return 0
        if purge:
            await queue.purge()
        count = queue.declaration_result.message_count or 0
        await channel.close()
        return count

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(aio_pika.exceptions.AMQPError, OSError):
                self._loop.run_until_complete(self._connection.close())
        self._loop.close()
        _rabbitmqctl("delete_vhost", self.name)


def _env(vhost: PrivateVhost, redis: PrivateRedis, **extra: str) -> dict[str, str]:
    return python_env(CELERY_BROKER_URL=vhost.url, CELERY_RESULT_BACKEND=redis.url, **extra)


def start_taskgate_amqp(
    children: Children, vhost: PrivateVhost, redis: PrivateRedis, db: PrivateDatabase
) -> Server:
    """``python -m service serve`` publishing to the vhost."""
    log = OUT / "taskgate-amqp.log"
    log.write_bytes(b"")
    env = _env(vhost, redis, DATABASE_URL=db.url, TASKGATE_LISTEN="127.0.0.1:0")
    process = children.spawn([sys.executable, "-m", "service", "serve"], log=log, env=env)
    port = wait_for_line(process, log, _LISTENING, timeout=60)
    return Server("taskgate", process, port, log)


def start_flower_amqp(children: Children, vhost: PrivateVhost, redis: PrivateRedis) -> Server:
    """Flower on the vhost (as ``bench.flower`` starts it on Redis)."""
    return start_flower_env(children, _env(vhost, redis), OUT / "flower-amqp.log")


@dataclass
class BatchSample:
    """One round of EnqueueBatch load on RabbitMQ."""

    tasks_per_second: float
    p50_ms: float
    p99_ms: float
    #: seconds from the end of the load until RabbitMQ held every acknowledged task
    publish_lag: float
    #: acknowledged tasks / (load + lag)
    published_per_second: float
    server_cpu_us_per_task: float
    #: the RabbitMQ node's CPU per task (None: the node is not a local process)
    broker_cpu_us_per_task: float | None


def _broker_pid() -> int | None:
    """The local RabbitMQ node's process (``beam.smp``), if there is one."""
    found = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True)
    return int(found.stdout.split()[0]) if found.returncode == 0 and found.stdout.strip() else None


def _batch_round(plan: Plan, children: Children, vhost: PrivateVhost, server: Server) -> BatchSample:
    vhost.purge()
    command = [
        sys.executable, "-m", "bench.loadgen", "--target", server.target, "--method", "batch",
        "--batch-size", str(plan.batch_size), "--concurrency", str(plan.batch_concurrency),
        "--warmup", "0", "--duration", str(plan.throughput_duration), "--channels", "1",
    ]  # fmt: skip
    broker = _broker_pid()
    cpu_before = cpu_seconds(server.pid)
    broker_before = cpu_seconds(broker) if broker else 0.0
    started = time.monotonic()
    line = children.run_json_line(
        command, log=OUT / "loadgen-amqp-batch.log", env=python_env(), timeout=plan.throughput_duration + 90
    )
    load_end = time.monotonic()
    result = LoadResult.from_json(line)
    if result.errors:
        raise RuntimeError(f"EnqueueBatch failed {result.errors} time(s): {result.first_error}")
    tasks = result.total_calls * plan.batch_size
    deadline = load_end + 120
    while (queued := vhost.depth()) < tasks and time.monotonic() < deadline:
        time.sleep(0.25)
    published_at = time.monotonic()
    broker_cpu = (cpu_seconds(broker) - broker_before) / max(tasks, 1) * 1e6 if broker else None
    if queued < tasks:
        raise RuntimeError(f"only {queued} of {tasks} acknowledged tasks reached RabbitMQ in 120 s")
    return BatchSample(
        tasks_per_second=result.rate * plan.batch_size,
        p50_ms=result.p50,
        p99_ms=result.p99,
        publish_lag=published_at - load_end,
        published_per_second=tasks / (published_at - started),
        server_cpu_us_per_task=(cpu_seconds(server.pid) - cpu_before) / max(tasks, 1) * 1e6,
        broker_cpu_us_per_task=broker_cpu,
    )


def _enqueue_rounds(
    plan: Plan, children: Children, redis: PrivateRedis, vhost: PrivateVhost, systems: list[System]
) -> None:
    for round_no in range(1, plan.rounds + 1):
        for system in systems:
            announce(f"amqp round {round_no}/{plan.rounds}: {system.key} @{plan.throughput_concurrency}")
            vhost.purge()
            system.throughput.append(
                measure(
                    children,
                    redis,
                    system,
                    plan.throughput_concurrency,
                    plan.warmup,
                    plan.throughput_duration,
                )
            )


def _median(samples: list[Sample], pick: str) -> float:
    values: list[float] = [getattr(s.result, pick) for s in samples]
    return statistics.median(values)


def _server_ms(samples: list[Sample]) -> float:
    return statistics.median([s.server_ms or 0.0 for s in samples])


def _report(plan: Plan, systems: list[System], batches: list[BatchSample], vhost: PrivateVhost) -> str:
    taskgate, flower = systems
    tg_rate, fl_rate = _median(taskgate.throughput, "rate"), _median(flower.throughput, "rate")
    ratio = tg_rate / fl_rate if fl_rate else 0.0
    errors = sum(s.result.errors for system in systems for s in system.throughput)
    batch_rate = statistics.median(b.tasks_per_second for b in batches)
    lines = [
        f"## RabbitMQ (AMQP, private vhost {vhost.name}) — Enqueue demo.add, medians of {plan.rounds} "
        f"alternating rounds ({plan.throughput_duration:g}s @{plan.throughput_concurrency} in flight)",
        "",
        "| | calls/s | p50 / p99 (ms) | server CPU per call (ms) |",
        "|---|---:|---:|---:|",
    ]
    for system in systems:
        lines.append(
            f"| {system.label} | {_median(system.throughput, 'rate'):,.0f} | "
            f"{_median(system.throughput, 'p50'):.1f} / {_median(system.throughput, 'p99'):.1f} | "
            f"{_server_ms(system.throughput):.3f} |"
        )
    lines += [
        "",
        f"taskgate / Flower on RabbitMQ: {ratio:.2f}x. Target ≥ {TARGET_FLOWER_RATIO:g}x: "
        f"{'MET' if ratio >= TARGET_FLOWER_RATIO else 'NOT MET'}."
        + (f" ({errors} call errors)" if errors else ""),
        "",
        f"## RabbitMQ — EnqueueBatch, {plan.batch_size} demo.add tasks per call, {plan.batch_concurrency} "
        f"calls in flight, medians of {len(batches)} rounds",
        "",
        "| | tasks/s | p50 / p99 per call (ms) | lag to broker after the load (s) | tasks/s to broker "
        "| gateway CPU per task (µs) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| taskgate EnqueueBatch (durable, confirmed) | {batch_rate:,.0f} | "
        f"{statistics.median(b.p50_ms for b in batches):.1f} / "
        f"{statistics.median(b.p99_ms for b in batches):.1f} | "
        f"{statistics.median(b.publish_lag for b in batches):.2f} | "
        f"{statistics.median(b.published_per_second for b in batches):,.0f} | "
        f"{statistics.median(b.server_cpu_us_per_task for b in batches):.0f} |",
        "",
        "Rounds (tasks/s acknowledged, lag s, RabbitMQ CPU µs per task): "
        + "; ".join(
            f"{b.tasks_per_second:,.0f}, {b.publish_lag:.1f}, "
            + (f"{b.broker_cpu_us_per_task:.0f}" if b.broker_cpu_us_per_task is not None else "—")
            for b in batches
        )
        + ".",
        "",
        f"Target ≥ {TARGET_BATCH_PER_SECOND:,} durable tasks/s: "
        f"{'MET' if batch_rate >= TARGET_BATCH_PER_SECOND else 'NOT MET'} ({batch_rate:,.0f}). Every round "
        "waits until RabbitMQ's queue holds every acknowledged task (publisher confirms, persistent "
        "messages), so the 'to broker' rate includes the outbox publishing them.",
    ]
    return "\n".join(lines)


def run_amqp(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Measure taskgate and Flower on a private RabbitMQ vhost; return the report section."""
    vhost = PrivateVhost()
    servers: list[Server] = []
    try:
        announce(f"amqp: vhost {vhost.name}; starting taskgate and Flower on it")
        taskgate = start_taskgate_amqp(children, vhost, redis, db)
        servers.append(taskgate)
        flower = start_flower_amqp(children, vhost, redis)
        servers.append(flower)
        client_env = python_env()
        systems = [
            System("amqp-taskgate", "taskgate Enqueue (durable, confirmed)", taskgate,
                   grpc_command(taskgate, plan.channels), client_env, pg=db),
            System("amqp-flower", "Flower async-apply", flower, http_command(flower), client_env),
        ]  # fmt: skip
        _enqueue_rounds(plan, children, redis, vhost, systems)
        batches: list[BatchSample] = []
        for round_no in range(1, plan.rounds + 1):
            announce(f"amqp round {round_no}/{plan.rounds}: EnqueueBatch x{plan.batch_size}")
            batches.append(_batch_round(plan, children, vhost, taskgate))
        return _report(plan, systems, batches, vhost)
    finally:
        for server in servers:
            children.stop(server.process)
        vhost.close()
