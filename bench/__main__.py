"""``python -m bench [--quick]``: every measurement, on a private database and Redis."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from types import FrameType

from bench.amqp import run_amqp
from bench.batch import run_batch
from bench.dispatch_lag import run_dispatch_lag
from bench.enqueue import contenders, report, run_rounds, samples_json
from bench.feed import run_feed
from bench.flower import start_flower
from bench.infra import OUT, ROOT, Children, PrivateDatabase, PrivateRedis, announce
from bench.listing import run_listing
from bench.operations import run_operations
from bench.pgbouncer import run_pgbouncer
from bench.plan import DEFAULT, QUICK, Plan
from bench.profile import profile_taskgate
from bench.scaleout import run_scaleout
from bench.schedules import run_schedules
from bench.servers import start_naive, start_taskgate
from bench.streams import run_streams
from bench.workflows import run_workflows


def _versions() -> str:
    names = ("grpcio", "celery", "kombu", "flower", "sqlalchemy", "asyncpg")
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} ?")
    return ", ".join(parts)


def _revision() -> str:
    """The checkout's commit, and whether service/ has uncommitted changes (what was measured)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service", "workers"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "git revision unknown"
    return f"commit {head}" + (f" + {len(dirty)} uncommitted file(s) in service/ workers/" if dirty else "")


def _header(plan: Plan, quick: bool) -> str:
    return "\n".join(
        [
            f"# taskgate benchmarks ({'--quick' if quick else 'default'}) — "
            f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC",
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {_versions()}",
            f"taskgate: {_revision()}",
            f"plan: {plan}",
            "Everything (servers, load generators, PostgreSQL, Redis) shares this machine: compare the",
            "ratios measured in one run, not absolute numbers across runs.",
        ]
    )


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop everything


def run_enqueue(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Sections 1 to 3: Enqueue against the naive gateway, raw send_task and Flower; the profile."""
    announce(f"private redis on port {redis.port}; starting taskgate, naive gateway and Flower")
    taskgate = start_taskgate(children, redis.url, db.url)
    naive = start_naive(children, redis.url)
    flower = start_flower(children, redis.url)
    try:
        systems = contenders(plan, redis, db, taskgate, naive, flower)
        run_rounds(plan, children, redis, systems)
        (OUT / "samples.json").write_text(samples_json(systems))
        sections = [report(plan, systems)]
        print(sections[-1] + "\n", flush=True)
        sections.append(profile_taskgate(plan, children, taskgate))
    finally:
        for server in (taskgate, naive, flower):
            children.stop(server.process)
    return "\n\n".join(sections)


SECTIONS: dict[str, Callable[[Plan, Children, PrivateRedis, PrivateDatabase], str]] = {
    "enqueue": run_enqueue,
    "batch": run_batch,
    "dispatch": run_dispatch_lag,
    "streams": run_streams,
    "scaleout": run_scaleout,
    "listing": run_listing,
    "workflows": run_workflows,
    "schedules": run_schedules,
    "operations": run_operations,
    "amqp": run_amqp,
    "pgbouncer": run_pgbouncer,
    "feed": run_feed,
}


def run(plan: Plan, quick: bool, only: list[str]) -> str:
    """The header and every section (or those in ``only``), on one private database and Redis."""
    OUT.mkdir(parents=True, exist_ok=True)
    sections = [_header(plan, quick)]
    print(sections[0] + "\n", flush=True)
    children = Children()
    db = PrivateDatabase()
    redis: PrivateRedis | None = None
    try:
        announce(f"creating database {db.name}")
        db.create()
        redis = PrivateRedis(children, OUT / "redis.log")
        for name, section in SECTIONS.items():
            if only and name not in only:
                continue
            sections.append(section(plan, children, redis, db))
            print(sections[-1] + "\n", flush=True)
            redis.drain_broker()
    finally:
        children.close()
        if redis is not None:
            redis.close()
        try:
            db.drop()
        except Exception as exc:  # noqa: BLE001 - report it, keep the original error
            announce(f"could not drop database {db.name}: {exc!r}")
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (a few seconds per measurement)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SECTIONS),
        default=[],
        help="run only this section (repeatable)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    plan = QUICK if args.quick else DEFAULT
    started = time.monotonic()
    text = run(plan, args.quick, args.only)
    name = ("report-quick" if args.quick else "report") + "".join(f"-{only}" for only in args.only) + ".txt"
    (OUT / name).write_text(text)
    announce(f"done in {time.monotonic() - started:.0f}s; report in {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
