"""Server limits: request sizes, open streams, stream lifetime, and each caller's rate."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from service.config import Settings
from service.domain.callers import Caller
from service.domain.errors import LimitExceeded, RateLimited


@dataclass(frozen=True, slots=True)
class InputLimits:
    """What a single request may carry."""

    #: Deepest nesting of lists and objects in args / kwargs (the top level is 1).
    max_args_depth: int = 32
    #: Serialized size of args + kwargs, in bytes.
    max_args_bytes: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """Every limit the server enforces, with their defaults."""

    #: Largest request message the server reads, in bytes.
    max_message_bytes: int = 1024 * 1024
    input: InputLimits = field(default_factory=InputLimits)
    #: Most tasks in one EnqueueBatch call.
    max_batch: int = 1000
    #: Open StreamProgress calls per caller (not applied to the anonymous caller of open mode).
    max_streams_per_caller: int = 100
    #: Open StreamProgress calls in this process.
    max_streams: int = 10_000
    #: Seconds a StreamProgress call may stay open; then RESOURCE_EXHAUSTED (call again).
    stream_lifetime: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceLimits:
        """The limits configured in ``settings``."""
        return cls(
            max_message_bytes=settings.max_message_bytes,
            input=InputLimits(settings.max_args_depth, settings.max_args_bytes),
            max_batch=settings.max_batch,
            max_streams_per_caller=settings.max_streams_per_caller,
            max_streams=settings.max_streams,
            stream_lifetime=settings.stream_lifetime,
        )


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """One token bucket per caller: ``rate`` per second, burst ``max(1, rate)``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, caller: Caller, cost: int = 1) -> None:
        """Take ``cost`` tokens (one per task) from the caller's bucket.

        A request costing more than the bucket holds passes once the bucket is full and
        leaves it in debt, so batches keep to the same long-run rate as single calls.

        Raises:
            RateLimited: the bucket is empty; ``retry_after`` says when one is back.
        """
        rate = caller.rate
        if rate is None:
            return
        burst = max(1.0, rate)
        now = self._clock()
        bucket = self._buckets.get(caller.name)
        if bucket is None:
            bucket = self._buckets[caller.name] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        needed = min(float(cost), burst)
        if bucket.tokens >= needed:
            bucket.tokens -= cost
            return
        retry_after = (needed - bucket.tokens) / rate
        raise RateLimited(
            f"rate limit: caller {caller.name!r} may enqueue {rate:g} tasks per second; "
            f"retry in {math.ceil(retry_after * 1000)} ms",
            retry_after,
        )


class StreamSlots:
    """Counts open streams, per caller and in all."""

    def __init__(self, per_caller: int, total: int) -> None:
        self._per_caller = per_caller
        self._total = total
        self._open: dict[str, int] = {}
        self._count = 0

    @property
    def open_count(self) -> int:
        """How many streams are open now."""
        return self._count

    @contextlib.contextmanager
    def hold(self, caller: Caller) -> Iterator[None]:
        """Hold one slot for the duration of the block.

        Raises:
            LimitExceeded: the process or the caller already has the most streams allowed.
        """
        if self._count >= self._total:
            raise LimitExceeded(
                f"open streams limit reached: {self._total} per server (TASKGATE_MAX_STREAMS); retry later"
            )
        held = self._open.get(caller.name, 0)
        if caller.name and held >= self._per_caller:
            raise LimitExceeded(
                f"open streams limit reached: {self._per_caller} per caller (TASKGATE_MAX_STREAMS_PER_CALLER)"
            )
        self._open[caller.name] = held + 1
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            left = self._open[caller.name] - 1
            if left:
                self._open[caller.name] = left
            else:
                del self._open[caller.name]
