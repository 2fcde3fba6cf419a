"""A bounded retry for the small Redis writes the worker library makes itself.

Progress reports and run-once claims are single commands against the result backend's
Redis. A short outage (a restart, a failover, a dropped connection) should cost a task a
pause, not its life: ``bounded`` retries such a command a few times with exponential
backoff and then gives up with the last error, so the caller decides what giving up means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The errors worth another try: the server was not reachable or did not answer in time.
TRANSIENT: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is, or wraps, an error worth another try (Celery's backend raises
    ``BackendStoreError`` from the connection error once its own retries are spent)."""
    seen: BaseException | None = exc
    for _ in range(3):
        if seen is None:
            return False
        if isinstance(seen, TRANSIENT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def bounded(
    operation: Callable[[], T],
    *,
    what: str,
    attempts: int = 6,
    first_delay: float = 0.1,
    max_delay: float = 2.0,
) -> T:
    """Run ``operation``, retrying transient Redis errors (``is_transient``) with backoff.

    With the defaults it tries 6 times over about 3.1 s (0.1 + 0.2 + 0.4 + 0.8 + 1.6).

    Args:
        operation: the call to make; retried as a whole.
        what: names the operation in the log lines.
        attempts: how many calls at most (at least 1).
        first_delay: seconds before the second call; doubled before each further call.
        max_delay: the longest pause between two calls, in seconds.

    Raises:
        Exception: the last transient error once ``attempts`` calls failed, or the first
            error that is not transient.
    """
    delay = first_delay
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            return operation()
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            log.warning("%s failed (%s); try %d of %d in %.1fs", what, exc, attempt + 1, attempts, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["TRANSIENT", "bounded", "is_transient"]
