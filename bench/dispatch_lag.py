"""Measurement 3: how late the outbox relay publishes a burst of held (far-future) tasks.

A gateway with ``TASKGATE_SCHEDULE_HORIZON=30`` holds every EnqueueAt task in the database;
its relay may publish each one (with a Celery eta) once it is within the horizon of its run
time. All tasks share one run time, so they all fall due at once; the lag of a task is
``publish_time - (run_time - 30 s)`` as the gateway recorded it in the ``tasks`` table, and
a task is late only if it reached the broker after its run time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import sys
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.drive import LoadResult, percentile
from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, python_env
from bench.plan import Plan
from bench.servers import start_taskgate
from service.store.tasks import tasks
from service.usecases.tasks import DISPATCH_LEAD

#: TASKGATE_SCHEDULE_HORIZON of the measured gateway, in seconds.
HORIZON = 30.0


async def _wait_published(
    url: str, run_time: dt.datetime, since: dt.datetime, deadline: float
) -> tuple[list[dt.datetime | None], int]:
    """Poll until every task of this run time is published (or the deadline), then read them.

    Also counts the other rows this phase's relay published (publish_time >= ``since``):
    tasks of the throughput phase whose outbox mark the previous gateway left behind.
    """
    engine = create_async_engine(url, poolclass=NullPool)
    mine = tasks.c.run_time == run_time
    try:
        async with engine.connect() as conn:
            while time.time() < deadline:
                pending = await conn.scalar(
                    sa.select(sa.func.count()).select_from(tasks).where(mine, tasks.c.publish_time.is_(None))
                )
                await conn.rollback()
                if pending == 0:
                    break
                await asyncio.sleep(0.5)
            rows = await conn.execute(sa.select(tasks.c.publish_time).where(mine))
            others = await conn.scalar(
                sa.select(sa.func.count()).select_from(tasks).where(~mine, tasks.c.publish_time >= since)
            )
            return [row.publish_time for row in rows], int(others or 0)
    finally:
        await engine.dispose()


#: Tasks of the calibration burst, scheduled a day ahead (held, never due during the run).
PROBE_TASKS = 500


def _enqueue_at(
    children: Children, plan: Plan, target: str, total: int, run_time: float, timeout: float
) -> LoadResult:
    command = [
        sys.executable, "-m", "bench.loadgen", "--target", target, "--method", "enqueue_at",
        "--concurrency", str(plan.throughput_concurrency), "--total", str(total),
        "--channels", str(plan.channels), "--run-time", str(run_time),
    ]  # fmt: skip
    line = children.run_json_line(command, log=OUT / "loadgen-lag.log", env=python_env(), timeout=timeout)
    return LoadResult.from_json(line)


def run_dispatch_lag(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Enqueue ``plan.scheduled_tasks`` tasks for one run time and report the relay's lag.

    The run time is set from the EnqueueAt rate measured by a calibration burst just before
    (held tasks skip the publish, so they go in faster than Enqueue): 1.25 x the expected
    enqueueing time + 5 s.
    """
    n = plan.scheduled_tasks
    lead = max(HORIZON, DISPATCH_LEAD.total_seconds())
    redis.drain_broker()
    since = dt.datetime.now(dt.UTC)
    server = start_taskgate(
        children, redis.url, db.url, log_name="taskgate-lag.log", TASKGATE_SCHEDULE_HORIZON=str(int(HORIZON))
    )
    try:
        probe = _enqueue_at(children, plan, server.target, PROBE_TASKS, time.time() + 86400, timeout=120)
        expected = n / max(probe.rate, 1.0)
        run_time = math.ceil(time.time() + 1.25 * expected + 5 + lead)  # a whole second: exact in PostgreSQL
        due = run_time - lead
        announce(
            f"dispatch lag: calibration {probe.rate:.0f}/s; EnqueueAt {n} tasks, "
            f"run_time in {run_time - time.time():.1f}s"
        )
        enqueued = _enqueue_at(
            children, plan, server.target, n, run_time, timeout=run_time - time.time() + 120
        )
        margin = due - time.time()
        announce(f"dispatch lag: enqueued at {enqueued.rate:.0f}/s, {margin:.1f}s before due; waiting")
        run_dt = dt.datetime.fromtimestamp(run_time, dt.UTC)
        published, others = asyncio.run(
            _wait_published(db.url, run_dt, since, deadline=run_time + 120 + n / 100)
        )
        in_broker = redis.queue_length()
    finally:
        children.stop(server.process)
    return _report(n, enqueued, margin, due, published, others, in_broker)


def _report(
    n: int,
    enqueued: LoadResult,
    margin: float,
    due: float,
    published: list[dt.datetime | None],
    others: int,
    in_broker: int,
) -> str:
    times = sorted(p.timestamp() for p in published if p is not None)
    lags = [(t - due) * 1000 for t in times]
    lead_ms = max(HORIZON, DISPATCH_LEAD.total_seconds()) * 1000
    after_run_time = sum(1 for lag in lags if lag > lead_ms)
    lines = [
        f"## 3. Dispatcher lag: {n} held tasks (EnqueueAt, TASKGATE_SCHEDULE_HORIZON=30) falling due at once",
        "",
        f"enqueued                : {enqueued.completed} ok, {enqueued.errors} errors, "
        f"{enqueued.rate:.0f} calls/s @64 in flight (p50 {enqueued.p50:.1f} ms, p99 {enqueued.p99:.1f} ms)",
        f"enqueueing finished     : {margin:.1f} s before the due time (run_time - 30 s)"
        + ("" if margin > 0 else "  ** LATE: the lag below includes enqueueing **"),
        f"rows / published / queue: {len(published)} rows, {len(times)} published, "
        f"{in_broker} messages in the broker",
        f"republished earlier rows: {others} (throughput-phase rows left unmarked by the previous gateway's "
        "shutdown,",
        "                          published again by this relay once their lease ran out)",
    ]
    if lags:
        span = times[-1] - times[0]
        rate = len(times) / span if span > 0 else float("inf")
        lines += [
            f"lag (publish - due)     : p50 {percentile(lags, 50):.0f} ms, "
            f"p99 {percentile(lags, 99):.0f} ms, max {lags[-1]:.0f} ms, min {lags[0]:.0f} ms",
            f"all published           : {lags[-1] / 1000:.2f} s after due "
            f"(first to last publish: {span:.2f} s, {rate:.0f} tasks/s)",
            f"publish batches         : {len(set(times))} distinct publish_time stamps (a batch of up to 500",
            "                          is stamped once, after all of it reached the broker: the first task's",
            "                          lag includes its whole batch)",
            f"published after run_time: {after_run_time} "
            f"(lag > {lead_ms:.0f} ms: reached the broker after it was due)",
        ]
    if len(times) < n:
        lines.append(f"** {n - len(times)} tasks were still unpublished at the deadline **")
    return "\n".join(lines)
