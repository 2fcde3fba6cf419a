"""The plain functions behind the demo tasks: testable without Celery."""

from __future__ import annotations

import time
from collections.abc import Callable


class DemoError(Exception):
    """Raised by ``demo.fail``."""


def add(x: float, y: float) -> float:
    """Return ``x + y``."""
    return x + y


def count_steps(steps: int, interval: float, on_step: Callable[[int, int], None]) -> int:
    """Sleep ``interval`` seconds ``steps`` times, calling ``on_step(i, steps)`` after each."""
    if steps < 0:
        raise ValueError("steps must not be negative")
    for i in range(1, steps + 1):
        time.sleep(interval)
        on_step(i, steps)
    return steps


def fail(message: str) -> None:
    """Raise ``DemoError(message)``."""
    raise DemoError(message)
