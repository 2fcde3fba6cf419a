"""Demo tasks: the README's tour and the integration tests' fixtures. Thin on purpose."""

from __future__ import annotations

import time
from typing import Any

from taskgate.worker import report_progress
from workers import app, settings, work


@app.task(name="demo.add")
def add(x: float, y: float) -> float:
    """Return ``x + y``."""
    return work.add(x, y)


@app.task(name="demo.progress")
def progress(steps: int, interval: float = 0.1) -> int:
    """Report progress 1..steps of steps, ``interval`` seconds apart; return ``steps``."""

    def on_step(i: int, total: int) -> None:
        report_progress(i, total, f"step {i} of {total}")

    return work.count_steps(steps, interval, on_step)


@app.task(name="demo.fail")
def fail(message: str) -> None:
    """Raise an error whose message contains ``message``."""
    work.fail(message)


@app.task(name="demo.sleep")
def sleep(seconds: float) -> float:
    """Sleep ``seconds`` and return it."""
    time.sleep(seconds)
    return seconds


@app.task(name="demo.record", bind=True)
def record(self: Any, tag: str) -> str:
    """Append ``tag`` to the Redis list ``<prefix>taskgate-demo-runs``: one entry per run.

    The tests count executions with it, from the worker's side.
    """
    self.backend.client.rpush(f"{settings.key_prefix}taskgate-demo-runs", f"{tag}|{self.request.id}")
    return tag


@app.task(name="demo.echo")
def echo(**kwargs: Any) -> dict[str, Any]:
    """Return the keyword arguments it was called with (kwargs named like enqueue options, too)."""
    return kwargs
