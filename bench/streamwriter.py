"""Stream-benchmark writer: ``python -m bench.streamwriter --ids FILE --rate R``.

Writes task states exactly as a worker does — through the ``workers`` Celery app's Redis
result backend (``backend.store_result``, which ``update_state`` and a task's success
call), with the request context of a real task so the document has every extended field —
at a steady ``rate`` per second: first one PROGRESS per task, then one SUCCESS per task.
Each carries its send time (``time.monotonic()``, taken just before the write) in
``details.sent`` (PROGRESS) or ``result.sent`` (SUCCESS). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from celery.app.task import Context

from taskgate.worker.contract import PROGRESS_STATE
from workers import app


def _request(task_id: str, queue: str) -> Context:
    """The task context a worker passes to ``store_result`` (read with ``result_extended``)."""
    return Context(
        id=task_id,
        task="demo.add",
        args=[2, 3],
        kwargs={},
        hostname=f"bench-writer@{socket.gethostname()}",
        retries=0,
        delivery_info={"routing_key": queue},
    )


def write(ids: list[str], rate: float, queue: str) -> dict[str, Any]:
    """Write PROGRESS then SUCCESS for every id at ``rate`` writes per second."""
    backend = app.backend
    phases: dict[str, Any] = {}
    for phase, state in (("progress", PROGRESS_STATE), ("success", "SUCCESS")):
        start = time.perf_counter() + 0.05
        behind = 0.0
        for i, task_id in enumerate(ids):
            due = start + i / rate
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            else:
                behind = max(behind, now - due)
            request = _request(task_id, queue)
            sent = time.monotonic()
            if state == PROGRESS_STATE:
                meta: dict[str, Any] = {
                    "current": 1, "total": 2, "message": "step 1 of 2", "details": {"sent": sent},
                }  # fmt: skip
            else:
                meta = {"sent": sent}
            backend.store_result(task_id, meta, state, request=request)
        elapsed = time.perf_counter() - start
        phases[phase] = {
            "writes": len(ids),
            "seconds": round(elapsed, 3),
            "rate": round(len(ids) / elapsed, 1) if elapsed > 0 else 0.0,
            "max_behind_ms": round(behind * 1000, 1),
        }
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streamwriter")
    parser.add_argument("--ids", type=Path, required=True, help="file of task ids, one per line")
    parser.add_argument("--rate", type=float, default=1000.0, help="writes per second")
    parser.add_argument("--queue", default="bench-streams")
    args = parser.parse_args(argv)
    ids = args.ids.read_text().split()
    result = write(ids, args.rate, args.queue)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
