"""ListTasks cost: the first page with a selective filter at two table sizes, from an index.

One private database is filled (``INSERT … SELECT generate_series``: 1% FAILED, the rest
SUCCEEDED, one hour apart per 1,000 tasks) to the small size, measured, then grown to the
large size and measured again. A measurement is the median of ``REPEATS`` first-page reads
through the store's listing query (the one ``ListTasks`` runs), after one warm-up read.
The EXPLAIN (ANALYZE, BUFFERS) plan at the large size goes into the report: the target is
that the page comes from an index, whatever the table size (large ≤ 2x small).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.infra import Children, PrivateDatabase, PrivateRedis, announce
from bench.plan import Plan
from service.api.listing import parse_filter
from service.domain.query import TaskQuery
from service.store.listing import TaskListing, select_page

REPEATS = 50
FILTER = 'state = FAILED AND task_name = "demo.*"'

_FILL = """
INSERT INTO tasks (task_id, task_name, state, queue, args, kwargs, options, caller, fingerprint,
                   retries, create_time, run_time, update_time, end_time, cancel_requested)
SELECT 'bench-' || lpad(n::text, 9, '0'),
       CASE WHEN n % 100 = 0 THEN 'demo.fail' ELSE 'demo.add' END,
       CASE WHEN n % 100 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END,
       'celery', '[1, 2]'::jsonb, '{}'::jsonb, '{}'::jsonb, '', 'x', 0,
       t, t, t, t, false
FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS n,
     LATERAL (SELECT timestamptz '2026-01-01 00:00:00+00' + n * interval '3.6 seconds') AS s(t)
"""


async def _fill(url: str, first: int, last: int) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(_FILL), {"first": first, "last": last})
        async with engine.connect() as conn:
            await conn.execute(sa.text("COMMIT"))
            await conn.execute(sa.text("VACUUM ANALYZE tasks"))
    finally:
        await engine.dispose()


async def _measure(url: str) -> tuple[float, int, str]:
    """(median ms, tasks on the page, EXPLAIN plan) of the first page of FILTER."""
    engine = create_async_engine(url, pool_size=1)
    listing = TaskListing(engine)
    query = TaskQuery(filter=parse_filter(FILTER), limit=50)
    try:
        now = dt.datetime.now(dt.UTC)
        page = await listing.page(query, now)  # warm-up
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            page = await listing.page(query, now)
            times.append((time.perf_counter() - start) * 1000)
        statement = select_page(query, now).compile(
            dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
            compile_kwargs={"literal_binds": True},
        )
        async with engine.connect() as conn:
            rows = await conn.execute(sa.text(f"EXPLAIN (ANALYZE, BUFFERS) {statement}"))
            plan = "\n".join(str(row[0]) for row in rows)
    finally:
        await engine.dispose()
    return statistics.median(times), len(page), plan


def run_listing(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Section: ListTasks' first page at ``plan.list_small`` and ``plan.list_large`` tasks."""
    own = PrivateDatabase()  # its own table: the other sections' tasks would skew the sizes
    own.create()
    try:
        announce(f"listing: filling {plan.list_small:,} tasks")
        asyncio.run(_fill(own.url, 1, plan.list_small))
        small_ms, small_n, _ = asyncio.run(_measure(own.url))
        announce(f"listing: growing to {plan.list_large:,} tasks")
        asyncio.run(_fill(own.url, plan.list_small + 1, plan.list_large))
        large_ms, large_n, explain = asyncio.run(_measure(own.url))
    finally:
        own.drop()
    ratio = large_ms / small_ms
    verdict = "MET" if ratio <= 2.0 else "NOT MET"
    return "\n".join(
        [
            f"## ListTasks — first page (50) of `{FILTER}`, median of {REPEATS} reads",
            "",
            "| tasks in the table | first page (ms) | tasks on the page |",
            "|---:|---:|---:|",
            f"| {plan.list_small:,} | {small_ms:.2f} | {small_n} |",
            f"| {plan.list_large:,} | {large_ms:.2f} | {large_n} |",
            "",
            f"large / small: {ratio:.2f}x. Target ≤ 2x: {verdict}.",
            f"EXPLAIN (ANALYZE, BUFFERS) at {plan.list_large:,} tasks:",
            "",
            *(f"    {line}" for line in explain.splitlines()),
        ]
    )
