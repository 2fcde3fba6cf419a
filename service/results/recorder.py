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

from redis.exceptions import RedisError

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

    async def run(self) -> None:
        """Write updates until cancelled."""
        backoff = 0.0
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._flush_interval + backoff)
            try:
                await self.flush()
                backoff = 0.0
            except Unavailable:
                backoff = min(max(backoff * 2, 0.5), 5.0)
                log.warning(
                    "recorder paused %.1fs: database unavailable (%d pending)", backoff, len(self._pending)
                )
            except Exception:  # a background loop must outlive any one failure
                # flush() kept the batch: it is written on the next try (a deadlock victim,
                # say); the traceback says what went wrong if it keeps failing
                backoff = min(max(backoff * 2, 0.5), 5.0)
                log.exception(
                    "recorder: writing %d update(s) failed; retrying in %.1fs", len(self._pending), backoff
                )

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

    async def reconcile_loop(self, hub: ProgressHub) -> None:
        """Re-read unfinished tasks from Redis on request and every reconcile interval."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._reconcile_interval):
                    await self._reconcile_now.wait()
            self._reconcile_now.clear()
            try:
                await self.reconcile(hub)
            except (Unavailable, RedisError, OSError) as exc:
                log.warning("reconcile skipped: %s", type(exc).__name__)
            except Exception:  # a background loop must outlive any one failure
                log.exception("reconcile failed; trying again at the next interval")

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
