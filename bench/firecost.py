"""CPU per schedule firing: gateway process and PostgreSQL backends, in µs per firing.

    .venv/bin/python -m bench.firecost [--schedules 10000] [--ahead 65] [--py-spy out.txt]

Starts a private Redis, a fresh private database and one gateway (``python -m service
serve``, no workers), writes ``--schedules`` paused schedules of ``demo.add`` (as
``bench.schedules`` does), measures the gateway's and the database backends' idle CPU rates
for ``IDLE`` seconds, then resumes them all as an hourly interval whose next slot is
``--ahead`` seconds away (more than the lead: the gateway decides them ahead, paced, then
publishes them at the slot, as in the ``schedules`` section). The window runs from the
resume until every firing is published.

Reported: the gateway's CPU seconds over the window and the CPU of the PostgreSQL backends
connected to the database (``/proc/<pid>/stat``, same host; a backend that exits within the
window is missed), each less its idle rate times the window, divided by the firings. CPU
time, not throughput: it holds on a machine shared with other work. ``--py-spy FILE`` also
records the gateway over the window with ``py-spy record --format raw`` (collapsed stacks)
for where the time goes (``--nonblocking``: its idle detection is rough, so read shares of
the non-event-loop samples, not absolute times).

Standalone (not a ``bench`` section): it measures the firing code, not a target.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, cpu_seconds
from bench.schedules import _insert  # the same schedules as the schedules section
from bench.servers import start_taskgate
from service.domain.schedule import Timing
from service.store.schedules import schedules
from service.store.tables import tasks

#: Seconds of idle gateway CPU measured before the resume (subtracted pro rata).
IDLE = 30.0
#: Seconds after the slot after which the script stops waiting.
GIVE_UP = 120.0


async def _resume(engine: AsyncEngine, ahead: float) -> dt.datetime:
    """Resume every schedule as an hourly interval whose next slot is ``ahead`` s away."""
    now = dt.datetime.now(dt.UTC)
    slot = (now + dt.timedelta(seconds=ahead)).replace(microsecond=0)
    timing = Timing(interval=dt.timedelta(hours=1))
    async with engine.begin() as conn:
        await conn.execute(
            schedules.update().values(
                spec=timing.to_json(), paused=False, next_run_time=slot, anchor_time=slot, update_time=now
            )
        )
    return slot


async def _published(engine: AsyncEngine) -> int:
    query = sa.select(sa.func.count(tasks.c.publish_time)).where(tasks.c.schedule_id.isnot(None))
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar() or 0)


async def _backends(db: PrivateDatabase) -> dict[int, float]:
    """CPU seconds of the database's backends (``backend_cpu`` runs a loop of its own)."""
    return await asyncio.to_thread(db.backend_cpu)


def _spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
               "--duration", str(int(seconds) + 1), "--nonblocking", "-o", str(out)]  # fmt: skip
    try:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        announce(f"firecost: no py-spy ({exc})")
        return None


async def _measure(db: PrivateDatabase, pid: int, count: int, ahead: float, spy: Path | None) -> str:
    engine = create_async_engine(db.url, poolclass=NullPool)
    try:
        await _insert(engine, count)
        idle_start, idle_cpu, idle_pg = time.monotonic(), cpu_seconds(pid), await _backends(db)
        await asyncio.sleep(IDLE)
        idle_rate = (cpu_seconds(pid) - idle_cpu) / (time.monotonic() - idle_start)
        idle_pg_rate = _delta(idle_pg, await _backends(db)) / (time.monotonic() - idle_start)
        pg_before = await _backends(db)
        started, cpu_before = time.monotonic(), cpu_seconds(pid)
        slot = await _resume(engine, ahead)
        spying = None if spy is None else _spy(pid, spy, ahead + 5)
        announce(f"firecost: {count:,} schedules due at {slot:%H:%M:%S} UTC")
        deadline = slot + dt.timedelta(seconds=GIVE_UP)
        published = 0
        while dt.datetime.now(dt.UTC) < deadline:
            published = await _published(engine)
            if published >= count:
                break
            await asyncio.sleep(0.25)
        window, gateway = time.monotonic() - started, cpu_seconds(pid) - cpu_before
        pg_after = await _backends(db)
        if spying is not None:
            spying.wait()
    finally:
        await engine.dispose()
    postgres = _delta(pg_before, pg_after)
    net, pg_net = gateway - idle_rate * window, postgres - idle_pg_rate * window
    per = 1e6 / max(published, 1)
    return (
        f"firings {published:,}/{count:,} over {window:.1f} s: gateway {gateway:.2f} CPU s "
        f"(idle {idle_rate * window:.2f} s subtracted: {net:.2f} s), PostgreSQL backends {postgres:.2f} s "
        f"(idle {idle_pg_rate * window:.2f} s subtracted: {pg_net:.2f} s)"
        f"\nper firing: gateway {net * per:,.0f} µs (gross {gateway * per:,.0f}), "
        f"PostgreSQL {pg_net * per:,.0f} µs (gross {postgres * per:,.0f})"
    )


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the backends used between two readings (new backends: all of theirs)."""
    return sum(cpu - before.get(backend, 0.0) for backend, cpu in after.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.firecost", description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--ahead", type=float, default=65.0, help="seconds from the resume to the slot")
    parser.add_argument("--py-spy", type=Path, default=None, help="collapsed stacks of the window here")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    children = Children()
    db = PrivateDatabase()
    redis: PrivateRedis | None = None
    try:
        db.create()
        redis = PrivateRedis(children, OUT / "redis-firecost.log")
        gateway = start_taskgate(children, redis.url, db.url, log_name="firecost.log")
        print(asyncio.run(_measure(db, gateway.pid, args.schedules, args.ahead, args.py_spy)), flush=True)
    finally:
        children.close()
        if redis is not None:
            redis.close()
        db.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
