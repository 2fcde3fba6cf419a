"""When the garbage collector may stop the event loop: a policy for a process of long-lived objects.

CPython 3.11 collects its oldest generation (a *full* collection: one stop-the-world pass
over every tracked object) whenever that generation has grown by a quarter since the last
one. An open StreamProgress costs about 64 tracked objects (45 of them grpc.aio's), so at
10,000 streams a full collection walks ~780,000 objects and stops the loop for 200-330 ms,
several times while the streams open and then every few minutes.

The ``managed`` policy keeps those passes out of the loop's way:

- at start-up, one full collection and then ``gc.freeze()``: what start-up made (modules,
  classes, functions) moves to the *permanent* generation, which collections never walk;
- young collections stay automatic (they walk only the objects allocated since the last
  one: a few thousand), but automatic full collections are off (a third threshold no count
  reaches);
- every ``interval`` seconds (a quarter of a second) a young collection (``gc.collect(1)``,
  so short-lived cycles die young) and ``gc.freeze()``: the survivors (open streams, their
  calls and tasks) are frozen too, so even an explicit ``gc.collect()`` does not walk them.
  Freezing splices lists: it costs the same at any size. An object that dies is freed by
  reference counting whether it is frozen or not. The young generations must be emptied
  this often because CPython's own trigger for a young collection (700 more allocations
  than deallocations) undercounts under steady traffic: each update a stream delivers
  frees the objects of its previous wait (old by then) and allocates those of its next one,
  so the count stays low while the young generation grows. Left to CPython, a young
  collection came every second or two and walked 40,000 objects, stopping the loop
  8-20 ms at 1,000 updates/s over 10,000 streams; every quarter second it walks a few
  thousand (the longest seen since: under 5 ms);
- what stays behind is *cyclic* garbage among old objects. A finished stream leaves almost
  none (measured: under 0.1 objects per finished stream), so a *reclaim*
  (``gc.unfreeze()``, a full collection, ``gc.freeze()``) runs rarely: when no stream is
  open (the pass is then short) and ``quiet_every`` seconds have gone by since the last one
  with streams open in between, and in any case every ``reclaim_every`` seconds.

``python`` leaves CPython's defaults alone (to compare, or should the policy misbehave).
Start-up and each reclaim are logged at INFO with counts and the pause; every ``report_every``
seconds one INFO line sums up the freezes (how many, longest pause).

``gc.get_freeze_count()`` walks the whole permanent generation (8 ms at 120,000 objects,
~25 ms at 250,000), so the policy reads it only at start-up.

References: the ``gc`` module's documentation (``freeze``, ``unfreeze``, ``set_threshold``),
and the CPython developer guide, "Garbage collector design" (generations, and the rule that
the oldest is collected only when it grew by 25%).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger(__name__)

Mode = Literal["managed", "python"]

#: A third threshold no count reaches: no automatic full collection ever runs.
NO_FULL_COLLECTIONS = 1 << 30


@dataclasses.dataclass(frozen=True, slots=True)
class ReclaimRule:
    """When to reclaim the cyclic garbage frozen among old objects (seconds).

    Args:
        quiet_every: Reclaim when quiet, if streams were open since the last reclaim and
            at least this long ago.
        reclaim_every: Reclaim at least this often, quiet or not (bounds what a leak holds;
            at 10,000 open streams it is a 200-300 ms pause).
    """

    quiet_every: float = 600.0
    reclaim_every: float = 3600.0

    def reason(self, since_reclaim: float, quiet: bool, busy_since_reclaim: bool) -> str | None:
        """Why a reclaim is due now (``"quiet"``, ``"periodic"``), or None when it is not.

        Args:
            since_reclaim: Seconds since the last reclaim (or start-up).
            quiet: No stream is open now.
            busy_since_reclaim: Some stream was open at a step since the last reclaim.
        """
        if quiet and busy_since_reclaim and since_reclaim >= self.quiet_every:
            return "quiet"
        if since_reclaim >= self.reclaim_every:
            return "periodic"
        return None


@dataclasses.dataclass(slots=True)
class FreezeTally:
    """The routine freezes since the last report."""

    count: int = 0
    max_ms: float = 0.0

    def add(self, paused_ms: float) -> None:
        """Record one freeze that paused the loop for ``paused_ms``."""
        self.count += 1
        self.max_ms = max(self.max_ms, paused_ms)


class GcPolicy:
    """Applies the collector policy ``mode`` to this process; ``run()`` keeps it up.

    Args:
        mode: ``managed`` (see the module docstring) or ``python`` (CPython's defaults).
        quiet: True when no long-lived work is open (no stream): a reclaim is then short.
            None: never quiet (reclaims only every ``rule.reclaim_every``).
        interval: Seconds between freezes of the survivors.
        rule: When a reclaim is due.
        report_every: Seconds between INFO summaries of the freezes.
    """

    def __init__(
        self,
        mode: Mode = "managed",
        *,
        quiet: Callable[[], bool] | None = None,
        interval: float = 0.25,
        rule: ReclaimRule | None = None,
        report_every: float = 300.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._mode = mode
        self._quiet = quiet or (lambda: False)
        self._interval = interval
        self._rule = rule or ReclaimRule()
        self._report_every = report_every
        self._tally = FreezeTally()
        self._busy = False
        self._last_reclaim = self._last_report = time.monotonic()

    @property
    def mode(self) -> Mode:
        """The policy in force."""
        return self._mode

    def start(self) -> None:
        """Collect once, freeze what start-up left, and turn automatic full collections off."""
        if self._mode != "managed":
            log.info("gc: CPython defaults, thresholds %s", gc.get_threshold())
            return
        started = time.perf_counter()
        collected = gc.collect()
        gc.freeze()
        paused_ms = (time.perf_counter() - started) * 1000.0
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, NO_FULL_COLLECTIONS)
        self._last_reclaim = self._last_report = time.monotonic()
        log.info(
            "gc: managed; start-up collection freed %d objects, froze %d, paused %.1f ms; thresholds %s",
            collected,
            gc.get_freeze_count(),
            paused_ms,
            gc.get_threshold(),
        )

    def step(self, now: float) -> None:
        """Freeze the survivors of a young collection; reclaim when due; report when due.

        Args:
            now: ``time.monotonic()``.
        """
        started = time.perf_counter()
        gc.collect(1)
        gc.freeze()
        self._tally.add((time.perf_counter() - started) * 1000.0)
        quiet = self._quiet()
        self._busy = self._busy or not quiet
        reason = self._rule.reason(now - self._last_reclaim, quiet, self._busy)
        if reason is not None:
            self.reclaim(reason)
            self._last_reclaim = now
            self._busy = not quiet
        if now - self._last_report >= self._report_every:
            self._report(now)

    def _report(self, now: float) -> None:
        young, middle, full = (stats["collections"] for stats in gc.get_stats())
        log.info(
            "gc: %d freezes in %.0f s, longest pause %.1f ms; collections so far: "
            "young %d, middle %d, full %d",
            self._tally.count,
            now - self._last_report,
            self._tally.max_ms,
            young,
            middle,
            full,
        )
        self._tally = FreezeTally()
        self._last_report = now

    def reclaim(self, reason: str = "requested") -> int:
        """Unfreeze, collect every generation, freeze again; log what it freed and took.

        Returns:
            How many unreachable objects the collection found.
        """
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        paused_ms = (time.perf_counter() - started) * 1000.0
        log.info(
            "gc: reclaim (%s) freed %d unreachable objects, paused %.1f ms", reason, collected, paused_ms
        )
        return collected

    async def run(self) -> None:
        """Apply the policy; then (managed) freeze, and reclaim when due, until cancelled."""
        self.start()
        if self._mode != "managed":
            return
        while True:
            await asyncio.sleep(self._interval)
            self.step(time.monotonic())
