"""Schedule firing: N cron schedules due in the same minute, on one gateway and on two, and
on one gateway under an Enqueue load (does firing starve Enqueue?).

Per case, a fresh private database; the gateway processes (``python -m service serve``, no
workers: the messages pile up in the broker list and are dropped) start first. Then the N
schedules (``demo.add``, SKIP) are written straight into the schedules table, paused, in
one transaction, and one ``UPDATE`` resumes them all as ``M * * * *`` (UTC) with their
next slot at the next minute boundary at least ``MARGIN`` seconds away: what
UpdateSchedule of ``spec`` and ``paused`` computes, for every schedule at once. The
gateways decide the slot up to ``LEAD`` before it (``service.usecases.schedules``) and
publish it at the slot; ``MARGIN`` is larger than the lead, so the schedules exist before
their lead window opens, as any schedule created a while before its slot does. The section
waits until every schedule's task is published.

Reported per case, from the tasks table: the firing lag of every firing, ``publish_time``
(the outbox marks it right after the LPUSH) minus the slot (from the firing's request_id);
the firings against the schedules; duplicates (tasks of one ``(schedule_id, slot)`` beyond
the first); the slots the schedules counted as skipped; the messages in the broker list;
which gateway fired how many (its log's per-round ``schedules: N task(s) fired`` lines);
the gateways' CPU seconds from the insert until the last firing is published.
Target: p99 ≤ 2 s, and no duplicate with two gateways on one database.

The third case adds the Python Enqueue load generator (``bench.loadgen``, ``LOAD_CONCURRENCY``
calls in flight) against the gateway three times in the same run: a quiet window just
before the lead window opens (no schedule work), a window from the start of the lead to 2 s
after the slot (deciding 10,000 slots ahead, then publishing them), and a second quiet
window once every firing is published (the two quiet windows bracket the firing one, so a
machine whose speed drifts shows as a difference between them). Flower (``bench.flower``,
its async-apply through ``bench.httpload``, the same calls in flight) runs on the same Redis
just before the first quiet window and again after the second. Reported: the Enqueue rates,
taskgate / Flower quiet (mean of both quiet windows) and while firing (the issue asks that
the ratio against Flower does not fall), firing / quiet, and that case's lags.

``BENCH_SCHEDULES_CASES`` (comma-separated ``1``, ``2``, ``load``; default all three) runs
only some cases, for comparing variants of the firing code.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench.drive import LoadResult, percentile
from bench.flower import start_flower
from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, cpu_seconds, python_env
from bench.plan import Plan
from bench.servers import Server, start_taskgate
from service.domain.schedule import Schedule, TaskTemplate, Timing
from service.store.schedules import row_of, schedules
from service.store.tables import tasks
from service.usecases.schedules import LEAD

#: Target of the p99 firing lag, in seconds.
TARGET_P99 = 2.0
#: Seconds the gateways decide a slot ahead of it.
LEAD_SECONDS = LEAD.total_seconds()
#: Enqueue calls in flight in the load case, and its quiet windows' length in seconds.
LOAD_CONCURRENCY = 16
QUIET_WINDOW = 15.0
#: The slot is at least this many seconds after the schedules are resumed: room for the
#: quiet windows (Flower, then taskgate) before the lead window opens.
MARGIN = LEAD_SECONDS + 2 * QUIET_WINDOW + 12.0
#: Seconds after the slot after which the section stops waiting for firings.
GIVE_UP = 180.0
#: Seconds without a new task (all published) before the count is final.
QUIET = 3.0
#: Rows per INSERT statement when writing the schedules.
CHUNK = 1_000
_FIRES = re.compile(rb"schedules: (\d+) task\(s\) fired")


@dataclass(frozen=True)
class Outcome:
    """What one case measured."""

    name: str
    schedules: int
    #: seconds, publish_time - slot, sorted, over every published firing
    lags: list[float]
    firings: int
    fired_schedules: int
    duplicates: int
    unpublished: int
    skipped: int
    messages: int
    per_gateway: list[int]
    #: os.getloadavg()[0] before the slot and after the last firing
    load: tuple[float, float]
    #: the Enqueue load case: (quiet before the lead window, while firing, quiet after every
    #: firing is published) results; quiet is measured on both sides, so drift shows
    enqueue: tuple[LoadResult, LoadResult, LoadResult] | None = None
    #: the Enqueue load case: Flower's async-apply before the quiet window and after the firings
    flower: tuple[LoadResult, LoadResult] | None = None
    #: CPU seconds of the gateways from the schedules' insert until every firing was published
    #: (with the load case: the Enqueue load's work included)
    gateway_cpu: float = float("nan")

    @property
    def met(self) -> bool:
        return (
            bool(self.lags)
            and percentile(self.lags, 99) <= TARGET_P99
            and self.duplicates == 0
            and self.firings == self.schedules
        )


def _paused_rows(count: int, now: dt.datetime) -> list[dict[str, object]]:
    """``count`` paused schedules of ``demo.add`` (a placeholder cron; the resume sets it)."""
    template = TaskTemplate("demo.add", args=[1, 2])
    timing = Timing(cron="0 * * * *")
    return [
        row_of(
            Schedule(
                schedule_id=f"bench-{i:06d}",
                timing=timing,
                task=template,
                paused=True,
                create_time=now,
                update_time=now,
                anchor_time=now,
            )
        )
        for i in range(count)
    ]


async def _insert(engine: AsyncEngine, count: int) -> None:
    rows = _paused_rows(count, dt.datetime.now(dt.UTC))
    async with engine.begin() as conn:
        for start in range(0, count, CHUNK):
            await conn.execute(schedules.insert(), rows[start : start + CHUNK])


async def _resume(engine: AsyncEngine, margin: float) -> dt.datetime:
    """Resume every schedule as ``M * * * *`` due at the next minute boundary ≥ ``margin``
    seconds away."""
    now = dt.datetime.now(dt.UTC)
    slot = (now + dt.timedelta(seconds=margin + 60)).replace(second=0, microsecond=0)
    timing = Timing(cron=f"{slot.minute} * * * *")
    assert timing.next_after(now, now) == slot, "the cron's next slot is the chosen minute"
    async with engine.begin() as conn:
        await conn.execute(
            schedules.update().values(
                spec=timing.to_json(), paused=False, next_run_time=slot, anchor_time=now, update_time=now
            )
        )
    return slot


async def _counts(engine: AsyncEngine) -> tuple[int, int]:
    """(tasks fired, tasks published) so far."""
    query = sa.select(sa.func.count(), sa.func.count(tasks.c.publish_time)).where(
        tasks.c.schedule_id.isnot(None)
    )
    async with engine.connect() as conn:
        total, published = (await conn.execute(query)).one()
    return int(total), int(published)


async def _settle(engine: AsyncEngine, count: int, slot: dt.datetime) -> None:
    """Wait until ``count`` tasks are published and nothing new came for QUIET seconds."""
    last, quiet_since = (-1, -1), time.monotonic()
    deadline = slot + dt.timedelta(seconds=GIVE_UP)
    while dt.datetime.now(dt.UTC) < deadline:
        current = await _counts(engine)
        if current != last:
            last, quiet_since = current, time.monotonic()
        elif current[1] >= count and time.monotonic() - quiet_since >= QUIET:
            return
        await asyncio.sleep(0.5)
    announce(f"schedules: gave up {GIVE_UP:.0f}s after the slot with {last[1]}/{count} published")


async def _collect(engine: AsyncEngine) -> tuple[list[float], int, int, int, int, int]:
    """(sorted lags, firings, schedules fired, duplicates, unpublished, skipped slots)."""
    query = sa.select(tasks.c.schedule_id, tasks.c.request_id, tasks.c.publish_time).where(
        tasks.c.schedule_id.isnot(None)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
        skipped = (await conn.execute(sa.select(sa.func.sum(schedules.c.skipped_count)))).scalar()
    lags: list[float] = []
    per_slot: dict[tuple[str, str], int] = {}
    for schedule_id, request_id, publish_time in rows:
        slot_ms = request_id.rsplit(":", 1)[1]
        key = (schedule_id, slot_ms)
        per_slot[key] = per_slot.get(key, 0) + 1
        if publish_time is not None:
            lags.append(publish_time.timestamp() - int(slot_ms) / 1000)
    duplicates = sum(n - 1 for n in per_slot.values())
    unpublished = len(rows) - len(lags)
    fired = len({schedule_id for schedule_id, _ in per_slot})
    return sorted(lags), len(rows), fired, duplicates, unpublished, int(skipped or 0)


#: Runs a load generator for (warm-up, duration) seconds; returns what it measured.
Loadgen = Callable[[float, float], LoadResult]


@dataclass(frozen=True)
class Loads:
    """The load case's load generators: taskgate's Enqueue and Flower's async-apply."""

    taskgate: Loadgen
    flower: Loadgen


async def _at(moment: dt.datetime) -> None:
    await asyncio.sleep(max((moment - dt.datetime.now(dt.UTC)).total_seconds(), 0.0))


async def _enqueue_windows(slot: dt.datetime, loads: Loads) -> tuple[LoadResult, LoadResult, LoadResult]:
    """Flower, then the Enqueue load, before the lead window (quiet), then the Enqueue load
    over lead window and slot."""
    lead = dt.timedelta(seconds=LEAD_SECONDS)
    # about a second of start-up, then 0.5 s of warm-up: each window ends well before the next
    await _at(slot - lead - dt.timedelta(seconds=2 * QUIET_WINDOW + 10))
    flower = await asyncio.to_thread(loads.flower, 0.5, QUIET_WINDOW)
    await _at(slot - lead - dt.timedelta(seconds=QUIET_WINDOW + 5))
    quiet = await asyncio.to_thread(loads.taskgate, 0.5, QUIET_WINDOW)
    await _at(slot - lead - dt.timedelta(seconds=1.5))
    firing = await asyncio.to_thread(loads.taskgate, 0.5, LEAD_SECONDS + 2)
    return flower, quiet, firing


async def _drive(
    url: str, count: int, loads: Loads | None
) -> tuple[tuple[list[float], int, int, int, int, int], tuple[LoadResult, ...] | None]:
    """Write, resume and wait for ``count`` schedules on ``url`` (under the load of ``loads``,
    if given); what ``_collect`` reads, and the load windows (Flower before, taskgate quiet,
    taskgate firing, taskgate quiet again, Flower after)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        started = time.monotonic()
        await _insert(engine, count)
        announce(f"schedules: {count:,} written in {time.monotonic() - started:.1f}s")
        slot = await _resume(engine, MARGIN if loads is not None else LEAD_SECONDS + 12.0)
        announce(f"schedules: all due at {slot:%H:%M:%S} UTC")
        before = None if loads is None else await _enqueue_windows(slot, loads)
        await _settle(engine, count, slot)
        if loads is None or before is None:
            return await _collect(engine), None
        quiet_after = await asyncio.to_thread(loads.taskgate, 0.5, QUIET_WINDOW)
        after = await asyncio.to_thread(loads.flower, 0.5, QUIET_WINDOW)
        return await _collect(engine), (*before, quiet_after, after)
    finally:
        await engine.dispose()


def _loadgen(children: Children, head: list[str], log: str) -> Loadgen:
    def run(warmup: float, duration: float) -> LoadResult:
        command = [
            sys.executable, "-m", *head, "--concurrency", str(LOAD_CONCURRENCY),
            "--warmup", str(warmup), "--duration", str(duration),
        ]  # fmt: skip
        line = children.run_json_line(command, log=OUT / log, env=python_env(), timeout=duration + 60)
        result = LoadResult.from_json(line)
        if result.errors:
            announce(f"schedules: {head[0]}: {result.errors} errors, first: {result.first_error}")
        return result

    return run


def _loads(children: Children, gateway: Server, flower: Server) -> Loads:
    enqueue = ["bench.loadgen", "--target", gateway.target, "--method", "enqueue"]
    apply = ["bench.httpload", "--port", str(flower.port)]
    return Loads(
        _loadgen(children, enqueue, "loadgen-schedules.log"),
        _loadgen(children, apply, "loadgen-schedules-flower.log"),
    )


def _case(plan: Plan, children: Children, redis: PrivateRedis, replicas: int, load: bool = False) -> Outcome:
    """One case: ``replicas`` gateways on a fresh database, ``plan.schedules`` schedules
    (with ``load``: under the Enqueue load generator)."""
    name = "1 gateway" if replicas == 1 else f"{replicas} gateways, one database"
    name += " + Enqueue load" if load else ""
    announce(f"schedules: {name}, {plan.schedules:,} schedules")
    db = PrivateDatabase()
    db.create()
    redis.drain_broker()
    load_before = os.getloadavg()[0]
    gateways: list[Server] = []
    flower: Server | None = None
    try:
        for n in range(replicas):
            gateways.append(start_taskgate(children, redis.url, db.url, log_name=f"schedules-{n}.log"))
        if load:
            flower = start_flower(children, redis.url)
        loads = _loads(children, gateways[0], flower) if flower is not None else None
        cpu_before = sum(cpu_seconds(g.process.pid) for g in gateways)
        collected, windows = asyncio.run(_drive(db.url, plan.schedules, loads))
        gateway_cpu = sum(cpu_seconds(g.process.pid) for g in gateways) - cpu_before
        lags, firings, fired, duplicates, unpublished, skipped = collected
        load_after = os.getloadavg()[0]
        per_gateway = [sum(int(n) for n in _FIRES.findall(g.log.read_bytes())) for g in gateways]
        messages = redis.queue_length()
    finally:
        for server in [*gateways, *([flower] if flower is not None else [])]:
            children.stop(server.process)
        db.drop()
        redis.drain_broker()
    enqueue = flowers = None
    if windows is not None:
        flower_before, quiet, firing, quiet_after, flower_after = windows
        enqueue, flowers = (quiet, firing, quiet_after), (flower_before, flower_after)
    return Outcome(
        name, plan.schedules, lags, firings, fired, duplicates, unpublished, skipped, messages,
        per_gateway, (load_before, load_after), enqueue, flowers, gateway_cpu,
    )  # fmt: skip


def _row(outcome: Outcome) -> str:
    lags = outcome.lags
    return (
        f"| {outcome.name} | {outcome.firings:,} / {outcome.schedules:,} | {outcome.duplicates} "
        f"| {percentile(lags, 50):.2f} | {percentile(lags, 99):.2f} | {max(lags, default=float('nan')):.2f} "
        f"| {outcome.unpublished} | {outcome.skipped} | {outcome.messages:,} "
        f"| {' + '.join(f'{n:,}' for n in outcome.per_gateway)} | {outcome.gateway_cpu:.1f} "
        f"| {outcome.load[0]:.2f} → {outcome.load[1]:.2f} | {'MET' if outcome.met else 'NOT MET'} |"
    )


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _window(label: str, result: LoadResult) -> str:
    return f"| {label} | {result.rate:,.0f} | {result.p50:.1f} | {result.p99:.1f} | {result.errors} |"


def _enqueue_lines(outcome: Outcome) -> list[str]:
    if outcome.enqueue is None or outcome.flower is None:
        return []
    quiet, firing, quiet_after = outcome.enqueue
    before, after = outcome.flower
    flower = (before.rate + after.rate) / 2
    calm = (quiet.rate + quiet_after.rate) / 2
    return [
        "",
        f"Enqueue while firing ({outcome.name}; {LOAD_CONCURRENCY} calls in flight, Python load generators):",
        "",
        "| window | calls/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|",
        _window(f"Flower async-apply, before the quiet window ({QUIET_WINDOW:g} s)", before),
        _window(f"taskgate Enqueue, quiet (before the lead window, {QUIET_WINDOW:g} s)", quiet),
        _window(f"taskgate Enqueue, firing (lead window to slot + 2 s, {LEAD_SECONDS + 2:g} s)", firing),
        _window(f"taskgate Enqueue, quiet (every firing published, {QUIET_WINDOW:g} s)", quiet_after),
        _window(f"Flower async-apply, after every firing is published ({QUIET_WINDOW:g} s)", after),
        "",
        f"taskgate / Flower (mean of both Flower windows, {flower:,.0f}/s): quiet (mean of both "
        f"quiet windows) {_div(calm, flower):.2f}, while firing {_div(firing.rate, flower):.2f}; "
        f"firing / quiet {_div(firing.rate, calm):.2f}. The broker messages of that case include "
        "both loads' tasks.",
    ]


def run_schedules(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Section: ``plan.schedules`` schedules due in one minute, on one gateway, then on two,
    then on one under an Enqueue load."""
    cases = os.environ.get("BENCH_SCHEDULES_CASES", "1,2,load").split(",")
    outcomes = [_case(plan, children, redis, int(case)) for case in cases if case in ("1", "2")]
    if "load" in cases:
        outcomes.append(_case(plan, children, redis, 1, load=True))
    verdict = "MET" if all(outcome.met for outcome in outcomes) else "NOT MET"
    return "\n".join(
        [
            f"## Schedules — {plan.schedules:,} cron schedules due in the same minute "
            f"(lag = publish_time - slot, seconds; decided up to {LEAD_SECONDS:g} s ahead)",
            "",
            "| case | firings / schedules | duplicates | p50 lag | p99 lag | max lag | unpublished "
            "| skipped slots | broker messages | fired by gateway | gateway CPU s "
            "| load avg (1 min) | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
            *(_row(outcome) for outcome in outcomes),
            *(line for outcome in outcomes for line in _enqueue_lines(outcome)),
            "",
            f"Target: every schedule fires once, p99 lag ≤ {TARGET_P99:g} s, 0 duplicates: {verdict}.",
        ]
    )
