"""The transactional outbox: every accepted task reaches the broker, even after outages.

A task's row and its "to publish" mark (``publish_after``) are committed together. Right
after the commit the task is handed to this relay's fast path; the relay also polls the
table for anything due whose lease ran out — tasks whose publishing failed, tasks left by
a gateway that crashed, and far-future tasks that were held in the database until shortly
before their run time. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease, so
replicas never publish the same row at the same time. A crash between publishing and
marking can still publish an id twice; the workers skip the second delivery
(``workers.guard``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence

from service.dispatch import Publisher
from service.domain import Delivery
from service.errors import Unavailable
from service.store import TaskStore

log = logging.getLogger(__name__)


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
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._lease = lease
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._pending: collections.deque[Delivery] = collections.deque()
        self._max_pending = max_pending
        self._wake = asyncio.Event()
        self._backoff = 0.0
        self._stopping = False

    @property
    def lease(self) -> dt.timedelta:
        """How long a claim on a row keeps other publishers off it."""
        return self._lease

    def submit(self, delivery: Delivery) -> None:
        """Publish a just-committed task soon. Never blocks; when the fast path is full the
        task simply waits for the relay (it is durable already)."""
        if len(self._pending) >= self._max_pending:
            log.warning("task_id=%s left to the relay: fast path full", delivery.task_id)
            return
        self._pending.append(delivery)
        self._wake.set()

    def request_stop(self) -> None:
        """Let ``run`` return after the batch in hand is published and marked."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled or asked to stop."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_interval + self._backoff)
            self._wake.clear()
            try:
                await self.run_once()
            except Unavailable as exc:
                self._backoff = min(max(self._backoff * 2, 0.5), 5.0)
                log.warning("outbox paused %.1fs: %s", self._backoff, exc)

    async def run_once(self) -> int:
        """Publish what is pending now and what the table says is due; return how many."""
        published = 0
        while self._pending:
            batch = [self._pending.popleft() for _ in range(min(self._batch_size, len(self._pending)))]
            published += await self._publish(batch)
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
        try:
            done = await self._publisher.publish(deliveries)
        except Unavailable:
            retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(self._backoff, 1.0))
            await self._store.retry_publish_at([d.task_id for d in deliveries], retry_at)
            raise
        self._backoff = 0.0
        now = dt.datetime.now(dt.UTC)
        await self._store.mark_published(done, now)
        if len(done) < len(deliveries):
            rest = [d.task_id for d in deliveries[len(done) :]]
            await self._store.retry_publish_at(rest, now + dt.timedelta(seconds=1))
        for task_id in done:
            log.debug("task_id=%s published", task_id)
        return len(done)
