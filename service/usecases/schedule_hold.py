"""Decided-ahead firings waiting in memory for their slot (``service.usecases.schedules``),
and the pace at which slots are decided ahead (``paced_limit``).

The tasks are recorded already, with a publish lease past their slot; ``Hold`` hands each
slot's deliveries to the outbox's fast path when the slot comes. Nothing here is durable:
``take_all`` empties the hold for a stopping gateway, which leaves the tasks to the relay.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from collections.abc import Callable, Sequence

from service.domain.model import Delivery

#: Slots are decided ahead at a pace that ends this long before them; a slot closer than
#: this is decided at once (with whatever else is due), unpaced.
RESERVE = dt.timedelta(seconds=3)
#: The longest round interval the pace assumes, in seconds.
MAX_TICK = 2.0
#: Seconds between rounds while only paced decisions are waiting (nothing due within
#: ``RESERVE``): fewer, larger rounds; each round's own cost is about that of 50 decisions.
PACED_POLL = 1.0


def paced_limit(
    urgent: int, ahead: int, earliest: dt.datetime | None, now: dt.datetime, tick: float, batch: int
) -> int:
    """How many schedules one firing round (every ``tick`` seconds) claims: all ``urgent``
    ones (due within ``RESERVE``), and of the ``ahead`` ones due later in the lead an even
    share, ``ahead * tick / seconds left`` until ``RESERVE`` before the earliest of them:
    they are all decided by then (a floor: the share only grows as the slot nears), spread
    over the lead window instead of in one burst at its start. At most ``batch``.
    """
    if earliest is None or ahead == 0:
        return min(batch, urgent)
    left = (earliest - RESERVE - now).total_seconds()
    share = ahead if left <= tick else math.ceil(ahead * tick / left)
    return min(batch, urgent + share)


class Pace:
    """``paced_limit`` at the rounds' real interval: on a loaded machine a round takes a
    while and the next one comes later than the poll interval, so a share sized for the
    poll interval alone would fall behind and leave a burst for the last seconds."""

    def __init__(self, poll: float) -> None:
        self._poll = poll
        self._last = -math.inf

    def limit(
        self, urgent: int, ahead: int, earliest: dt.datetime | None, now: dt.datetime, batch: int
    ) -> int:
        """``paced_limit`` for this round, its tick the time since the previous round began."""
        started = time.monotonic()
        tick = min(max(self._poll, started - self._last), MAX_TICK)
        self._last = started
        return paced_limit(urgent, ahead, earliest, now, tick, batch)

    def pause(self, urgent: int) -> float:
        """Seconds until the next round: the poll interval, or ``PACED_POLL`` while nothing
        is due within ``RESERVE`` (only decisions ahead are waiting)."""
        return self._poll if urgent else max(self._poll, PACED_POLL)


class Hold:
    """Deliveries by slot, each slot with the timer that submits it."""

    def __init__(self, submit: Callable[[Sequence[Delivery]], None]) -> None:
        self._submit = submit
        self._held: dict[dt.datetime, list[Delivery]] = {}
        self._timers: dict[dt.datetime, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return sum(len(deliveries) for deliveries in self._held.values())

    def hand_over(self, deliveries: Sequence[Delivery]) -> None:
        """Submit the deliveries whose ``run_time`` has come; hold the rest until it comes."""
        loop = asyncio.get_running_loop()
        now = dt.datetime.now(dt.UTC)
        ready = [delivery for delivery in deliveries if delivery.run_time <= now]
        if ready:
            self._submit(ready)
        for delivery in deliveries:
            slot = delivery.run_time
            if slot <= now:
                continue
            if slot not in self._held:
                self._held[slot] = []
                self._timers[slot] = loop.call_later((slot - now).total_seconds(), self._due, slot)
            self._held[slot].append(delivery)

    def take_all(self) -> list[str]:
        """Stop every timer and return the ids of everything held (the hold is then empty)."""
        for timer in self._timers.values():
            timer.cancel()
        ids = [delivery.task_id for deliveries in self._held.values() for delivery in deliveries]
        self._timers.clear()
        self._held.clear()
        return ids

    def _due(self, slot: dt.datetime) -> None:
        self._timers.pop(slot, None)
        deliveries = self._held.pop(slot, [])
        if deliveries:
            self._submit(deliveries)
