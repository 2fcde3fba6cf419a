"""Schedule firing: N cron schedules due in the same minute, on one gateway and on two.

Per case, a fresh private database; the gateway processes (``python -m service serve``, no
workers: the messages pile up in the broker list and are dropped) start first. Then the N
schedules (``demo.add``, SKIP) are written straight into the schedules table, paused, in
one transaction, and one ``UPDATE`` resumes them all as ``M * * * *`` (UTC) with their
next slot at the next minute boundary at least ``MARGIN`` seconds away: what
UpdateSchedule of ``spec`` and ``paused`` computes, for every schedule at once. Nothing
then happens until the slot; the section waits until every schedule's task is published.

Reported per case, from the tasks table: the firing lag of every firing, ``publish_time``
(the outbox marks it right after the LPUSH) minus the slot (from the firing's request_id);
the firings against the schedules; duplicates (tasks of one ``(schedule_id, slot)`` beyond
the first); the slots the schedules counted as skipped; the messages in the broker list;
which gateway fired how many (its log's per-round ``schedules: N task(s) fired`` lines).
Target: p99 ≤ 2 s, and no duplicate with two gateways on one database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench.drive import percentile
from bench.infra import Children, PrivateDatabase, PrivateRedis, announce
from bench.plan import Plan
from bench.servers import Server, start_taskgate
from service.domain.schedule import Schedule, TaskTemplate, Timing
from service.store.schedules import row_of, schedules
from service.store.tables import tasks

#: Target of the p99 firing lag, in seconds.
TARGET_P99 = 2.0
#: The slot is at least this many seconds after the schedules are resumed.
MARGIN = 3.0
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


async def _drive(url: str, count: int) -> tuple[list[float], int, int, int, int, int]:
    """Write, resume and wait for ``count`` schedules on ``url``; what ``_collect`` reads."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        started = time.monotonic()
        await _insert(engine, count)
        announce(f"schedules: {count:,} written in {time.monotonic() - started:.1f}s")
        slot = await _resume(engine)
        announce(f"schedules: all due at {slot:%H:%M:%S} UTC")
        await _settle(engine, count, slot)
        return await _collect(engine)
    finally:
        await engine.dispose()


def _case(plan: Plan, children: Children, redis: PrivateRedis, replicas: int) -> Outcome:
    """One case: ``replicas`` gateways on a fresh database, ``plan.schedules`` schedules."""
    name = "1 gateway" if replicas == 1 else f"{replicas} gateways, one database"
    announce(f"schedules: {name}, {plan.schedules:,} schedules")
    db = PrivateDatabase()
    db.create()
    redis.drain_broker()
    load_before = os.getloadavg()[0]
    gateways: list[Server] = []
    try:
        for n in range(replicas):
            gateways.append(start_taskgate(children, redis.url, db.url, log_name=f"schedules-{n}.log"))
        lags, firings, fired, duplicates, unpublished, skipped = asyncio.run(_drive(db.url, plan.schedules))
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
        per_gateway, (load_before, load_after),
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


def run_schedules(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Section: ``plan.schedules`` schedules due in one minute, on one gateway, then on two."""
    outcomes = [_case(plan, children, redis, replicas) for replicas in (1, 2)]
    verdict = "MET" if all(outcome.met for outcome in outcomes) else "NOT MET"
    return "\n".join(
        [
            f"## Schedules — {plan.schedules:,} cron schedules due in the same minute "
            "(lag = publish_time - slot, seconds)",
            "",
            "| case | firings / schedules | duplicates | p50 lag | p99 lag | max lag | unpublished "
            "| skipped slots | broker messages | fired by gateway | load avg (1 min) | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
            *(_row(outcome) for outcome in outcomes),
            "",
            f"Target: every schedule fires once, p99 lag ≤ {TARGET_P99:g} s, 0 duplicates: {verdict}.",
        ]
    )
