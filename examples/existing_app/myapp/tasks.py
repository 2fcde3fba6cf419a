"""The app's tasks. Two ways to report progress, both read by the gateway."""

from __future__ import annotations

import time
from typing import Any

from myapp.celery_app import app
from taskgate.worker import report_progress


@app.task(name="reports.build")
def build(n: int, interval: float = 0.05) -> dict[str, int]:
    """Render ``n`` pages, ``interval`` seconds each, reporting each page; return the count."""
    for page in range(1, n + 1):
        time.sleep(interval)
        report_progress(page, n, f"rendered page {page} of {n}", page=page)
    return {"pages": n}


@app.task(name="reports.count", bind=True)
def count(self: Any, n: int, interval: float = 0.05) -> int:
    """Count to ``n`` with Celery's own ``update_state``: no taskgate import needed."""
    for i in range(1, n + 1):
        time.sleep(interval)
        self.update_state(state="PROGRESS", meta={"current": i, "total": n, "message": f"{i} of {n}"})
    return n
