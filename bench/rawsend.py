"""Raw Celery: ``send_task`` in a loop from one thread, for a fixed time; prints one JSON line.

Uses the gateway's own send-only app (``service.broker.publisher.send_only_app``: JSON, no result
backend), configured from ``CELERY_BROKER_URL``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from bench.drive import LoadResult, percentile
from service.broker.publisher import send_only_app
from taskgate.worker.contract import CelerySettings


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(*, warmup: float, duration: float) -> LoadResult:
    app = send_only_app(CelerySettings())
    try:
        total = 0
        latencies: list[float] = []
        start = time.perf_counter() + warmup
        end = start + duration
        cpu_start: float | None = None
        while (t0 := time.perf_counter()) < end:
            if cpu_start is None and t0 >= start:
                cpu_start = _cpu_seconds()
            app.send_task("demo.add", args=[2, 3], kwargs={})
            t1 = time.perf_counter()
            total += 1
            if t1 >= start:
                latencies.append((t1 - t0) * 1000)
        cpu = _cpu_seconds() - (cpu_start or 0.0)
    finally:
        app.close()
    latencies.sort()
    return LoadResult(
        completed=len(latencies),
        errors=0,
        elapsed=duration,
        rate=len(latencies) / duration,
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        max=latencies[-1] if latencies else float("nan"),
        total_calls=total,
        client_cpu=cpu / duration,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rawsend")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    sys.stdout.write(run(warmup=args.warmup, duration=args.duration).to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
