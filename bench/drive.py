"""The closed-loop load driver shared by every load generator: N calls in flight."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

#: One worker's call: performs one request, raises on failure.
Call = Callable[[], Awaitable[None]]


@dataclass
class LoadResult:
    """What one load-generator run measured (times in milliseconds, rate in calls/s)."""

    completed: int
    errors: int
    elapsed: float
    rate: float
    p50: float
    p90: float
    p99: float
    max: float
    #: Every call that completed, warm-up and tail included (to divide server CPU by).
    total_calls: int
    #: CPU the load generator itself used during the window, in cores (1.0 = one core busy).
    client_cpu: float
    first_error: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadResult:
        return cls(**json.loads(text))


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest-rank; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(
    calls: list[Call],
    *,
    warmup: float,
    duration: float,
    total: int | None = None,
) -> LoadResult:
    """Keep ``len(calls)`` requests in flight (one worker per call).

    Duration mode: run ``warmup`` seconds, then count the calls that complete in the next
    ``duration`` seconds. Count mode (``total``): issue exactly ``total`` calls, no warm-up,
    and time them all.
    """
    latencies: list[float] = []
    errors = 0
    finished = 0
    first_error = ""
    issued = 0
    now = time.perf_counter()
    start = now + (0.0 if total is not None else warmup)
    end = start + duration if total is None else float("inf")
    cpu_start: float | None = _cpu_seconds() if total is not None else None

    async def worker(call: Call) -> None:
        nonlocal errors, finished, first_error, issued, cpu_start
        while True:
            if total is not None:
                if issued >= total:
                    return
                issued += 1
            t0 = time.perf_counter()
            if t0 >= end:
                return
            if cpu_start is None and t0 >= start:
                cpu_start = _cpu_seconds()
            try:
                await call()
            except Exception as exc:  # noqa: BLE001 - any failed call counts as an error
                errors += 1
                first_error = first_error or repr(exc)[:300]
                await asyncio.sleep(0.01)  # do not spin on a dead server
                continue
            t1 = time.perf_counter()
            finished += 1
            if start <= t1 < end:
                latencies.append((t1 - t0) * 1000)

    await asyncio.gather(*(worker(call) for call in calls))
    stop = time.perf_counter()
    cpu_used = _cpu_seconds() - (cpu_start if cpu_start is not None else _cpu_seconds())
    elapsed = (stop - start) if total is not None else duration
    latencies.sort()
    return LoadResult(
        completed=len(latencies),
        errors=errors,
        elapsed=elapsed,
        rate=len(latencies) / elapsed if elapsed > 0 else 0.0,
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        max=latencies[-1] if latencies else float("nan"),
        total_calls=finished,
        client_cpu=cpu_used / elapsed if elapsed > 0 else 0.0,
        first_error=first_error,
    )
