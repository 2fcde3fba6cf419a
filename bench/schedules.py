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
which gateway fired how many (its log's per-round ``schedules: N task(s) fired`` lines).
Target: p99 ≤ 2 s, and no duplicate with two gateways on one database.

The third case adds the Python Enqueue load generator (``bench.loadgen``, ``LOAD_CONCURRENCY``
calls in flight) against the gateway twice in the same run: a window just before the lead
window opens (no schedule work), and a window from the start of the lead to 2 s after the
slot (deciding 10,000 slots ahead, then publishing them). Reported: both Enqueue rates and
their ratio (firing / quiet; the issue asks that it does not fall), and that case's lags.
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
from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, python_env
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
#: The slot is at least this many seconds after the schedules are resumed: room for the
#: quiet Enqueue window before the lead window opens.
MARGIN = LEAD_SECONDS + 12.0
#: Enqueue calls in flight in the load case, and its quiet window's length in seconds.
LOAD_CONCURRENCY = 16
QUIET_WINDOW = 5.0
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
    #: the Enqueue load case: (quiet, while firing) results
    enqueue: tuple[LoadResult, LoadResult] | None = None

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


async def _resume(engine: AsyncEngine) -> dt.datetime:
    """Resume every schedule as ``M * * * *`` due at the next minute boundary ≥ MARGIN away."""
    now = dt.datetime.now(dt.UTC)
    slot = (now + dt.timedelta(seconds=MARGIN + 60)).replace(second=0, microsecond=0)
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


#: Runs the Enqueue load generator for (warm-up, duration) seconds; returns what it measured.
Loadgen = Callable[[float, float], LoadResult]


async def _at(moment: dt.datetime) -> None:
    await asyncio.sleep(max((moment - dt.datetime.now(dt.UTC)).total_seconds(), 0.0))


async def _enqueue_windows(slot: dt.datetime, loadgen: Loadgen) -> tuple[LoadResult, LoadResult]:
    """The Enqueue load before the lead window (quiet), then over lead window and slot."""
    lead = dt.timedelta(seconds=LEAD_SECONDS)
    # about a second of start-up, then 0.5 s of warm-up: each window ends well before the next
    await _at(slot - lead - dt.timedelta(seconds=QUIET_WINDOW + 5))
    quiet = await asyncio.to_thread(loadgen, 0.5, QUIET_WINDOW)
    await _at(slot - lead - dt.timedelta(seconds=1.5))
    firing = await asyncio.to_thread(loadgen, 0.5, LEAD_SECONDS + 2)
    return quiet, firing


async def _drive(
    url: str, count: int, loadgen: Loadgen | None
) -> tuple[tuple[list[float], int, int, int, int, int], tuple[LoadResult, LoadResult] | None]:
    """Write, resume and wait for ``count`` schedules on ``url`` (under the Enqueue load of
    ``loadgen``, if given); what ``_collect`` reads, and the Enqueue windows."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        started = time.monotonic()
        await _insert(engine, count)
        announce(f"schedules: {count:,} written in {time.monotonic() - started:.1f}s")
        slot = await _resume(engine)
        announce(f"schedules: all due at {slot:%H:%M:%S} UTC")
        enqueue = None if loadgen is None else await _enqueue_windows(slot, loadgen)
        await _settle(engine, count, slot)
        return await _collect(engine), enqueue
    finally:
        await engine.dispose()


def _loadgen(children: Children, target: str) -> Loadgen:
    def run(warmup: float, duration: float) -> LoadResult:
        command = [
            sys.executable, "-m", "bench.loadgen", "--target", target, "--method", "enqueue",
            "--concurrency", str(LOAD_CONCURRENCY), "--warmup", str(warmup), "--duration", str(duration),
        ]  # fmt: skip
        line = children.run_json_line(
            command, log=OUT / "loadgen-schedules.log", env=python_env(), timeout=duration + 60
        )
        return LoadResult.from_json(line)

    return run


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
    try:
        for n in range(replicas):
            gateways.append(start_taskgate(children, redis.url, db.url, log_name=f"schedules-{n}.log"))
        loadgen = _loadgen(children, gateways[0].target) if load else None
        collected, enqueue = asyncio.run(_drive(db.url, plan.schedules, loadgen))
        lags, firings, fired, duplicates, unpublished, skipped = collected
        load_after = os.getloadavg()[0]
        per_gateway = [sum(int(n) for n in _FIRES.findall(g.log.read_bytes())) for g in gateways]
        messages = redis.queue_length()
    finally:
        for gateway in gateways:
            children.stop(gateway.process)
        db.drop()
        redis.drain_broker()
    return Outcome(
        name, plan.schedules, lags, firings, fired, duplicates, unpublished, skipped, messages,
        per_gateway, (load_before, load_after), enqueue,
    )  # fmt: skip


def _row(outcome: Outcome) -> str:
    lags = outcome.lags
    return (
        f"| {outcome.name} | {outcome.firings:,} / {outcome.schedules:,} | {outcome.duplicates} "
        f"| {percentile(lags, 50):.2f} | {percentile(lags, 99):.2f} | {max(lags, default=float('nan')):.2f} "
        f"| {outcome.unpublished} | {outcome.skipped} | {outcome.messages:,} "
        f"| {' + '.join(f'{n:,}' for n in outcome.per_gateway)} "
        f"| {outcome.load[0]:.2f} → {outcome.load[1]:.2f} | {'MET' if outcome.met else 'NOT MET'} |"
    )


def _enqueue_lines(outcome: Outcome) -> list[str]:
    if outcome.enqueue is None:
        return []
    quiet, firing = outcome.enqueue
    ratio = firing.rate / quiet.rate if quiet.rate else float("nan")
    return [
        "",
        f"Enqueue while firing ({outcome.name}; {LOAD_CONCURRENCY} calls in flight, Python load generator):",
        "",
        "| window | Enqueue/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|",
        f"| quiet (before the lead window, {QUIET_WINDOW:g} s) | {quiet.rate:,.0f} | {quiet.p50:.1f} "
        f"| {quiet.p99:.1f} | {quiet.errors} |",
        f"| firing (lead window to slot + 2 s, {LEAD_SECONDS + 2:g} s) | {firing.rate:,.0f} "
        f"| {firing.p50:.1f} | {firing.p99:.1f} | {firing.errors} |",
        "",
        f"Enqueue ratio firing / quiet: {ratio:.2f} (the broker messages of that case include the "
        "Enqueue load's tasks).",
    ]


def run_schedules(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Section: ``plan.schedules`` schedules due in one minute, on one gateway, then on two,
    then on one under an Enqueue load."""
    outcomes = [_case(plan, children, redis, replicas) for replicas in (1, 2)]
    outcomes.append(_case(plan, children, redis, 1, load=True))
    verdict = "MET" if all(outcome.met for outcome in outcomes) else "NOT MET"
    return "\n".join(
        [
            f"## Schedules — {plan.schedules:,} cron schedules due in the same minute "
            f"(lag = publish_time - slot, seconds; decided up to {LEAD_SECONDS:g} s ahead)",
            "",
            "| case | firings / schedules | duplicates | p50 lag | p99 lag | max lag | unpublished "
            "| skipped slots | broker messages | fired by gateway | load avg (1 min) | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
            *(_row(outcome) for outcome in outcomes),
            *(line for outcome in outcomes for line in _enqueue_lines(outcome)),
            "",
            f"Target: every schedule fires once, p99 lag ≤ {TARGET_P99:g} s, 0 duplicates: {verdict}.",
        ]
    )
