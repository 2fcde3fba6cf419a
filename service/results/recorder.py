"""Writes every observed state change to the database, watched or not.

Updates from the shared subscription are coalesced per task and written in batches, so a
burst of progress reports costs one UPDATE per task per flush. Pub/sub drops what is
published while nobody listens, so a reconcile pass also re-reads the Redis state of every
unfinished task after each (re)subscribe and every ``reconcile_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from service.domain.errors import Unavailable
from service.domain.model import TaskUpdate, merge_updates
from service.store.tasks import TaskStore

if TYPE_CHECKING:
    from service.results.hub import ProgressHub

log = logging.getLogger(__name__)


#: Task states read per Redis MGET by a reconcile pass.
RECONCILE_CHUNK = 100


class Recorder:
    """Coalesces task updates and writes them to the store."""

    def __init__(
        self,
        store: TaskStore,
        *,
        flush_interval: float = 0.05,
        batch_size: int = 500,
        reconcile_interval: float = 30.0,
    ) -> None:
        self._store = store
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._reconcile_interval = reconcile_interval
        self._pending: dict[str, TaskUpdate] = {}
        self._wake = asyncio.Event()
        self._reconcile_now = asyncio.Event()

    def record(self, update: TaskUpdate) -> None:
        """Queue an update for writing; never blocks."""
        older = self._pending.get(update.task_id)
        self._pending[update.task_id] = update if older is None else merge_updates(older, update)
        self._wake.set()

    def request_reconcile(self) -> None:
        """Re-read every unfinished task from Redis soon."""
        self._reconcile_now.set()

    async def step(self) -> None:
        """Wait for updates, then write them (one round; run it supervised).

        When the write fails the batch stays pending (``flush`` puts it back) and is written
        on the next round, after the supervisor's backoff.
        """
        await self._wake.wait()
        await asyncio.sleep(self._flush_interval)
        await self.flush()

    async def flush(self) -> None:
        """Write everything pending now."""
        while self._pending:
            ids = list(self._pending)[: self._batch_size]
            batch = [self._pending.pop(task_id) for task_id in ids]
            try:
                await self._write(batch)
            except BaseException:
                self._requeue(batch)
                raise
        self._wake.clear()

    async def _write(self, batch: list[TaskUpdate]) -> None:
        """Write a batch. An update the database refuses (not an outage) must not hold back
        the others: the batch is then written one update at a time, and the refused one is
        logged and dropped."""
        try:
            await self._store.apply_updates(batch)
            return
        except Unavailable:
            raise
        except Exception:  # noqa: BLE001 - whatever the database refused, isolate it
            log.warning("recorder: a batch of %d was refused; writing one at a time", len(batch))
        for update in batch:
            try:
                await self._store.apply_updates([update])
            except Unavailable:
                raise
            except Exception:
                log.exception(
                    "task_id=%s: the database refused this %s update; dropped", update.task_id, update.state
                )

    def _requeue(self, batch: list[TaskUpdate]) -> None:
        """Put a batch back (unless newer updates of its tasks arrived meanwhile, merged in)."""
        for update in batch:
            newer = self._pending.get(update.task_id)
            self._pending[update.task_id] = update if newer is None else merge_updates(update, newer)

    async def reconcile_step(self, hub: ProgressHub) -> None:
        """Wait for a request or the reconcile interval, then re-read unfinished tasks from
        Redis (one round; run it supervised)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._reconcile_interval):
                await self._reconcile_now.wait()
        self._reconcile_now.clear()
        await self.reconcile(hub)

    async def reconcile(self, hub: ProgressHub, limit: int = 1000) -> int:
        """One reconcile pass; returns how many updates it found.

        The ids are read from Redis ``RECONCILE_CHUNK`` at a time: one MGET of 1,000 states
        and their decoding held the event loop for about 20 ms (measured with 10,000 streams
        open); between chunks the loop serves everything else while the next MGET is in flight.
        """
        ids = await self._store.active_ids(limit)
        found = 0
        for start in range(0, len(ids), RECONCILE_CHUNK):
            updates = await hub.snapshots(ids[start : start + RECONCILE_CHUNK])
            for update in updates:
                self.record(update)
            found += len(updates)
        return found
