"""How long the event loop stalls: a task that sleeps a few milliseconds and times its wake-up.

Every callback runs to completion before the loop looks at its timers, so a task asking to
wake ``interval`` seconds from now wakes late by however long the loop was busy with
something else: that lateness is the stall the monitor records. A stall that begins before
the timer is due is partly hidden, so a single stall of S ms shows up as at least
``S - interval``. Even an idle loop wakes up to about 1 ms late (epoll counts whole
milliseconds), which sets the floor of the numbers.

The statistics go into a fixed histogram (no per-sample memory), are logged on request as
one line and then start again::

    event loop stalls since last report: samples=1200 p50_ms=0.15 p99_ms=1.05 max_ms=3.42 ...

A single stall over ``warn_ms`` is logged as a WARNING when it happens. Every sample also
reads the loop thread's CPU clock: on a machine short of CPUs a process can wake late
without its loop having been busy, and ``busy_p99_ms`` / ``busy_max_ms`` count only the
part of the lateness during which the loop's thread was running (callbacks, the garbage
collector).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import time

from service.runtime import telemetry

log = logging.getLogger(__name__)

#: Below this, buckets are ``_FINE_STEP_MS`` wide.
_FINE_LIMIT_MS = 10.0
_FINE_STEP_MS = 0.05
_FINE_BUCKETS = round(_FINE_LIMIT_MS / _FINE_STEP_MS)
#: Above ``_FINE_LIMIT_MS``, each decade (10-100 ms, 100-1000 ms, ...) has this many buckets.
_PER_DECADE = 90
_DECADES = 4  # up to 100 s; anything longer lands in the last bucket
_BUCKETS = _FINE_BUCKETS + _DECADES * _PER_DECADE


def _bucket(ms: float) -> int:
    """The histogram bucket of a lateness of ``ms`` (>= 0) milliseconds."""
    if ms < _FINE_LIMIT_MS:
        return int(ms / _FINE_STEP_MS)
    decade = min(int(math.log10(ms)), _DECADES)  # 1 for 10-100 ms, 2 for 100-1000 ms, ...
    step = 10.0 ** (decade - 1)  # 1 ms in 10-100 ms, 10 ms in 100-1000 ms, ...
    offset = min(max(int((ms - 10.0**decade) / step), 0), _PER_DECADE - 1)
    return _FINE_BUCKETS + (decade - 1) * _PER_DECADE + offset


def _upper_edge(index: int) -> float:
    """The upper edge (ms) of bucket ``index``."""
    if index < _FINE_BUCKETS:
        return (index + 1) * _FINE_STEP_MS
    decade, offset = divmod(index - _FINE_BUCKETS, _PER_DECADE)
    decade += 1
    return 10.0**decade + (offset + 1) * 10.0 ** (decade - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class StallReport:
    """Event-loop lateness over one reporting window (milliseconds)."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: How many single stalls exceeded the warning threshold.
    over_warn: int
    #: Length of the window, in seconds.
    window_s: float
    #: The same lateness counting only the time the loop's thread was running (CPU time): a
    #: stall much longer than this was the process waiting for a CPU, not the loop being busy.
    busy_p99_ms: float = 0.0
    busy_max_ms: float = 0.0
    #: Full (oldest-generation) garbage collections in the window: each stops the loop for
    #: a time that grows with the number of live objects.
    gc_full: int = 0

    def line(self) -> str:
        """One log line, ``key=value`` pairs after a fixed text (easy to grep and parse)."""
        return (
            f"event loop stalls since last report: samples={self.samples} p50_ms={self.p50_ms:.2f} "
            f"p99_ms={self.p99_ms:.2f} max_ms={self.max_ms:.2f} over_warn={self.over_warn} "
            f"window_s={self.window_s:.1f} busy_p99_ms={self.busy_p99_ms:.2f} "
            f"busy_max_ms={self.busy_max_ms:.2f} gc_full={self.gc_full}"
        )


class StallStats:
    """A fixed-size histogram of lateness samples (milliseconds), with the exact maximum.

    Percentiles are the upper edge of the bucket they fall in (never above the maximum):
    0.05 ms resolution below 10 ms, then 90 buckets per decade (1 ms steps in 10-100 ms,
    10 ms steps in 100-1000 ms, ...).
    """

    __slots__ = ("_counts", "_max", "_over", "_samples", "_warn_ms")

    def __init__(self, warn_ms: float = math.inf) -> None:
        self._warn_ms = warn_ms
        self._counts = [0] * _BUCKETS
        self._samples = 0
        self._max = 0.0
        self._over = 0

    @property
    def samples(self) -> int:
        """How many samples were added since the last reset."""
        return self._samples

    @property
    def maximum(self) -> float:
        """The largest sample since the last reset, in ms (0.0 without samples)."""
        return self._max

    def add(self, ms: float) -> None:
        """Record one lateness of ``ms`` milliseconds (negative counts as 0)."""
        ms = max(ms, 0.0)
        self._counts[_bucket(ms)] += 1
        self._samples += 1
        if ms > self._max:
            self._max = ms
        if ms > self._warn_ms:
            self._over += 1

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) in ms, nearest rank; 0.0 without samples."""
        if not self._samples:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self._samples))
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                return min(_upper_edge(index), self._max)
        return self._max  # pragma: no cover - the counts add up to the samples

    def report(self, window_s: float) -> StallReport:
        """The statistics so far (does not reset)."""
        return StallReport(
            samples=self._samples,
            p50_ms=self.percentile(50),
            p99_ms=self.percentile(99),
            max_ms=self._max,
            over_warn=self._over,
            window_s=window_s,
        )

    def reset(self) -> None:
        """Forget every sample."""
        self._counts = [0] * _BUCKETS
        self._samples = 0
        self._max = 0.0
        self._over = 0


def _full_collections() -> int:
    return int(gc.get_stats()[-1]["collections"])


#: Below this share of a sampling period spent running, the loop counts as idle.
IDLE_SHARE = 0.05


def next_wait(interval: float, idle_interval: float, elapsed: float, cpu: float) -> float:
    """The wait before the next sample: ``interval`` after a period in which the loop's
    thread ran at least ``IDLE_SHARE`` of the ``elapsed`` seconds (``cpu``), else (an idle
    loop, which has nothing to stall) ``idle_interval``."""
    return interval if cpu >= IDLE_SHARE * elapsed else idle_interval


class LoopWatch:
    """Samples the running loop's lateness every ``interval`` seconds while it works.

    Each sample also reads the loop thread's CPU clock, so a stall can be told apart from
    the process merely waiting for a CPU on a busy machine (``busy_*`` in the report). An
    idle loop (its thread ran under ``IDLE_SHARE`` of the last period) is sampled every
    ``idle_interval`` seconds instead: each wake-up costs CPU (about 150 µs here: a gateway
    sampling every 5 ms spent 35 of its 54 ms/s idle CPU on it), and an idle loop has
    nothing to stall. The first sample after work begins again comes at most
    ``idle_interval`` later, so a stall at that moment shows up shortened by up to that much.

    Args:
        interval: Seconds between samples while the loop works.
        warn_ms: A single stall longer than this (milliseconds) is logged as a WARNING.
        idle_interval: Seconds between samples while the loop is idle (default: ``interval``).
    """

    def __init__(
        self, interval: float = 0.005, warn_ms: float = 100.0, idle_interval: float | None = None
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._interval = interval
        self._idle_interval = max(interval, idle_interval or interval)
        self._warn_ms = warn_ms
        self._stats = StallStats(warn_ms)
        self._busy = StallStats()
        self._since = time.monotonic()
        self._gc_full = _full_collections()

    def add(self, late_ms: float, cpu_ms: float) -> None:
        """Record one sample.

        Args:
            late_ms: How late the timer woke, in milliseconds.
            cpu_ms: CPU time the loop's thread used since the timer was set, in milliseconds.
        """
        self._stats.add(late_ms)
        if (metrics := telemetry.current) is not None:
            metrics.loop_lag.observe(late_ms / 1000.0)
        busy_ms = min(late_ms, cpu_ms)
        self._busy.add(busy_ms)
        if late_ms > self._warn_ms:
            log.warning("event loop stalled for %.0f ms (%.0f ms of it running)", late_ms, busy_ms)

    async def run(self) -> None:
        """Sample until cancelled."""
        interval, idle_interval = self._interval, self._idle_interval
        clock = time.monotonic  # not loop.time(): uvloop's is cached per loop iteration
        cpu = time.thread_time  # the loop's thread only
        wait = interval
        while True:
            cpu_start, start = cpu(), clock()
            due = start + wait
            await asyncio.sleep(wait)
            now, used = clock(), cpu() - cpu_start
            self.add((now - due) * 1000.0, used * 1000.0)
            wait = next_wait(interval, idle_interval, now - start, used)

    def report(self, *, reset: bool = True) -> StallReport:
        """The statistics since the last reset; then (by default) start a new window."""
        now = time.monotonic()
        gc_full = _full_collections()
        result = dataclasses.replace(
            self._stats.report(now - self._since),
            busy_p99_ms=self._busy.percentile(99),
            busy_max_ms=self._busy.maximum,
            gc_full=gc_full - self._gc_full,
        )
        if reset:
            self._stats.reset()
            self._busy.reset()
            self._since = now
            self._gc_full = gc_full
        return result

    def log_report(self) -> None:
        """Log the statistics since the last report as one INFO line, and start a new window.

        Meant as a signal handler (``loop.add_signal_handler(signal.SIGUSR1, watch.log_report)``).
        """
        log.info("%s", self.report().line())
