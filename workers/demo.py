"""Demo tasks: the README's tour and the integration tests' fixtures. Thin on purpose.

The tasks that take time (``demo.sleep``, ``demo.progress``, ``demo.record``) opt in to
at-least-once runs: ``acks_late=True`` keeps their message in the broker until the run
ends, so a worker that dies mid-run leaves it to be delivered again (the run-once guard
lets that delivery through once the dead worker's heartbeat is gone). They keep
``reject_on_worker_lost=False``: a pool process killed under a task (OOM, a segfault in
the task's own code) ends the task FAILED with ``WorkerLostError`` instead of requeueing
it, since a task that kills its process every time would otherwise loop for ever.
"""

from __future__ import annotations

import time
from typing import Any

from taskgate.worker import report_progress
from workers import app, settings, work

#: Options of the tasks that opt in to being run again when their worker dies.
AT_LEAST_ONCE: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": False}


@app.task(name="demo.add")
def add(x: float, y: float) -> float:
    """Return ``x + y``."""
    return work.add(x, y)


@app.task(name="demo.progress", **AT_LEAST_ONCE)
def progress(steps: int, interval: float = 0.1) -> int:
    """Report progress 1..steps of steps, ``interval`` seconds apart; return ``steps``."""

    def on_step(i: int, total: int) -> None:
        report_progress(i, total, f"step {i} of {total}")

    return work.count_steps(steps, interval, on_step)


@app.task(name="demo.fail")
def fail(message: str) -> None:
    """Raise an error whose message contains ``message``."""
    work.fail(message)


@app.task(name="demo.sleep", **AT_LEAST_ONCE)
def sleep(seconds: float) -> float:
    """Sleep ``seconds`` and return it."""
    time.sleep(seconds)
    return seconds


@app.task(name="demo.record", bind=True, **AT_LEAST_ONCE)
def record(self: Any, tag: str) -> str:
    """Append ``tag`` to the Redis list ``<prefix>taskgate-demo-runs``: one entry per run.

    The tests count executions with it, from the worker's side.
    """
    self.backend.client.rpush(f"{settings.key_prefix}taskgate-demo-runs", f"{tag}|{self.request.id}")
    return tag


@app.task(name="demo.flaky", bind=True)
def flaky(self: Any, tag: str, failures: int = 1) -> str:
    """Fail (and retry 0.2 s later) ``failures`` times, then return ``tag``: a RETRY state."""
    if self.request.retries < failures:
        raise self.retry(exc=work.DemoError(f"{tag}: attempt {self.request.retries + 1}"), countdown=0.2)
    return tag


@app.task(name="demo.echo")
def echo(**kwargs: Any) -> dict[str, Any]:
    """Return the keyword arguments it was called with (kwargs named like enqueue options, too)."""
    return kwargs


@app.task(name="demo.sum")
def sum_(values: list[float]) -> float:
    """Return the sum of ``values`` (a chord's callback: the list of its group's results)."""
    return sum(values)
