"""The transactional outbox: every accepted task reaches the broker, even after outages.

A task's row and its "to publish" mark (``publish_after``) are committed together. Right
after the commit the task is handed to this relay's fast path; the relay also polls the
table for anything due whose lease ran out — tasks whose publishing failed, tasks left by
a gateway that crashed, and far-future tasks that were held in the database until shortly
before their run time. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease, so
replicas never publish the same row at the same time. A crash between publishing and
marking can still publish an id twice; the workers skip the second delivery
(``taskgate.worker.guard``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Sequence

from service.broker.publisher import Publisher
from service.domain.errors import Unavailable
from service.domain.model import Delivery
from service.runtime import telemetry
from service.store.tasks import TaskStore

log = logging.getLogger(__name__)

#: Seconds since the last publish under which the fast path counts as busy.
_BUSY = 0.05


class Outbox:
    """Publishes committed tasks and relays whatever is still unpublished."""

    def __init__(
        self,
        store: TaskStore,
        publisher: Publisher,
        *,
        lease: dt.timedelta = dt.timedelta(seconds=30),
        poll_interval: float = 0.5,
        batch_size: int = 500,
        max_pending: int = 50_000,
        backlog: int = 10_000,
        mark_interval: float = 0.1,
        linger: float = 0.005,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._lease = lease
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._pending: collections.deque[Delivery] = collections.deque()
        self._max_pending = max_pending
        #: above this many tasks waiting for the fast path, new enqueues wait (``room``)
        self._backlog = backlog
        self._drained = asyncio.Event()
        self._drained.set()
        #: published but not yet marked in the database; marked together, at most
        #: ``mark_interval`` seconds later (their lease keeps every relay off them meanwhile),
        #: each with the moment the broker took it (its ``publish_time``)
        self._unmarked: list[tuple[str, dt.datetime]] = []
        self._mark_interval = mark_interval
        #: seconds the fast path waits for company before publishing a small batch, when
        #: the previous publish was less than ``_BUSY`` ago (under load; never when idle)
        self._linger = linger
        self._last_publish = -math.inf
        self._wake = asyncio.Event()
        self._backoff = 0.0
        self._stopping = False

    @property
    def lease(self) -> dt.timedelta:
        """How long a claim on a row keeps other publishers off it."""
        return self._lease

    async def room(self, timeout: float = 5.0) -> None:
        """Wait while the fast path has more than ``backlog`` tasks waiting to be published.

        Backpressure: under a sustained load the publisher cannot keep up with, enqueues
        slow down to its pace instead of piling up tasks that would reach the broker only
        after the lease. Never waits while the broker is down (the outbox keeps every task
        then), nor longer than ``timeout`` seconds.
        """
        if len(self._pending) <= self._backlog or self._backoff:
            return
        self._drained.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._drained.wait()

    def submit(self, delivery: Delivery) -> None:
        """Publish a just-committed task soon. Never blocks; when the fast path is full the
        task simply waits for the relay (it is durable already)."""
        self.submit_many((delivery,))

    def submit_many(self, deliveries: Sequence[Delivery]) -> None:
        """``submit`` for several tasks (one wake-up)."""
        room = self._max_pending - len(self._pending)
        if len(deliveries) > room:
            log.warning("%d task(s) left to the relay: fast path full", len(deliveries) - max(room, 0))
        if room > 0:
            self._pending.extend(deliveries[:room])
            self._wake.set()

    @property
    def stopping(self) -> bool:
        """True once ``request_stop`` was called: ``run`` returns after the batch in hand."""
        return self._stopping

    def request_stop(self) -> None:
        """Let ``run`` return after the batch in hand is published and marked."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled or asked to stop.

        Just-committed tasks are published as soon as they arrive; the table is polled for
        due rows every ``poll_interval`` seconds; published ids are marked in batches.
        After a broker failure everything waits out a backoff (1 to 5 s).
        """
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        next_mark = loop.time() + self._mark_interval
        try:
            while not self._stopping:
                now = loop.time()
                fast_path = bool(self._pending) and not self._backoff
                deadline = min(next_poll, next_mark if self._unmarked else next_poll)
                if not fast_path and deadline > now:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(deadline - now):
                            await self._wake.wait()
                self._wake.clear()
                busy = loop.time() - self._last_publish < _BUSY
                if busy and self._linger and 0 < len(self._pending) < self._batch_size:
                    await asyncio.sleep(self._linger)  # under load, a few ms make batches of many
                try:
                    if not self._backoff or loop.time() >= next_poll:
                        await self._publish_pending()
                    if loop.time() >= next_poll:
                        await self._relay_due()
                        next_poll = loop.time() + self._poll_interval
                    if self._unmarked and (
                        loop.time() >= next_mark or len(self._unmarked) >= self._batch_size
                    ):
                        await self._mark()
                        next_mark = loop.time() + self._mark_interval
                except Unavailable as exc:
                    # the fast path stays off and enqueues feel no backpressure while the
                    # broker or the database is down; any other failure ends this run and
                    # the supervisor starts it again (every task is still in the table)
                    self._backoff = min(max(self._backoff * 2, 1.0), 5.0)
                    next_poll = loop.time() + self._backoff
                    log.warning("outbox paused %.1fs: %s", self._backoff, exc)
        finally:
            with contextlib.suppress(Unavailable):
                await self._mark()

    async def run_once(self) -> int:
        """Publish what is pending now and what the table says is due, mark it all; return how many."""
        published = await self._publish_pending()
        published += await self._relay_due()
        await self._mark()
        return published

    async def _publish_pending(self) -> int:
        published = 0
        while self._pending:
            batch = [self._pending.popleft() for _ in range(min(self._batch_size, len(self._pending)))]
            if len(self._pending) <= self._backlog // 2:
                self._drained.set()
            published += await self._publish(batch)
        self._drained.set()
        return published

    async def _relay_due(self) -> int:
        published = 0
        while True:
            now = dt.datetime.now(dt.UTC)
            due = await self._store.claim_due(now, lease=self._lease, limit=self._batch_size)
            if not due:
                break
            published += await self._publish(due)
            if len(due) < self._batch_size:
                break
        return published

    async def _publish(self, deliveries: Sequence[Delivery]) -> int:
        started = time.perf_counter()
        try:
            done = await self._publisher.publish(deliveries)
        except Unavailable:
            retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(self._backoff, 1.0))
            await self._store.retry_publish_at([d.task_id for d in deliveries], retry_at)
            raise
        if (metrics := telemetry.current) is not None:
            metrics.publish_seconds.observe(time.perf_counter() - started)
        self._backoff = 0.0
        self._last_publish = asyncio.get_running_loop().time()
        published_at = dt.datetime.now(dt.UTC)
        self._unmarked.extend((task_id, published_at) for task_id in done)
        if len(done) < len(deliveries):
            rest = [d.task_id for d in deliveries[len(done) :]]
            await self._store.retry_publish_at(rest, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
        return len(done)

    async def _mark(self) -> None:
        """Clear the outbox mark of everything published so far (one UPDATE per batch); the
        publish time written is when the broker took the batch's last task, not the mark's."""
        while self._unmarked:
            batch = self._unmarked[: self._batch_size]
            await self._store.mark_published([task_id for task_id, _ in batch], batch[-1][1])
            del self._unmarked[: len(batch)]
