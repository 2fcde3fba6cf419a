"""Writes every observed state change to the database, watched or not.

Updates from the shared subscription are coalesced per task and written in batches, so a
burst of progress reports costs one UPDATE per task per flush. Pub/sub drops what is
published while nobody listens, so a reconcile pass also re-reads the Redis state of every
unfinished task (all of them, page by page) after each (re)subscribe and every
``reconcile_interval`` seconds. The durable path is the state feed (``feed.py``); the
reconcile covers workers that do not write it and entries the feed's trimming dropped.

With the feed on (``feed=True``), a state would otherwise be written twice, or once per
replica: every replica receives every pub/sub message, while each feed entry goes to one
replica. A taskgate worker marks every document it also appends to the feed
(``contract.FEED_MARK``, ``TaskUpdate.in_feed``): the pub/sub copy of a marked document
(``record_published``) is left to the feed, so each state is written once by the replica
that reads its entry; of marked states read from Redis (``record``: a status read's
refresh, the reconcile) only a terminal one is written, since a read may be older than
what the feed has written meanwhile. Documents without the mark (a worker from before the
mark that still feeds) are matched by task instead: the feed tells the recorder which
tasks this process has read (``fed``), and their pub/sub updates are left to it from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from service.domain.errors import Unavailable
from service.domain.model import TaskUpdate, merge_updates
from service.runtime import telemetry
from service.store.adoption import AdoptionStore
from service.store.base import ActiveKey
from service.store.tasks import TaskStore

if TYPE_CHECKING:
    from service.results.hub import ProgressHub

log = logging.getLogger(__name__)


#: Task states read per Redis MGET by a reconcile pass.
RECONCILE_CHUNK = 100
#: Unfinished tasks read per database query by a reconcile pass.
RECONCILE_PAGE = 1000
#: Task ids the state feed has read that the recorder remembers (about 3 MB; the least
#: recently fed are forgotten, and a pub/sub update of a forgotten task is written again,
#: which is harmless).
FED_MEMORY = 20_000


class Recorder:
    """Coalesces task updates and writes them to the store."""

    def __init__(
        self,
        store: TaskStore,
        *,
        flush_interval: float = 0.05,
        batch_size: int = 500,
        reconcile_interval: float = 30.0,
        adoption: AdoptionStore | None = None,
        feed: bool = False,
    ) -> None:
        self._store = store
        #: this process consumes the state feed: marked documents are written from there
        self._feed = feed
        #: inserts rows for tasks sent around the gateway first (None: TASKGATE_ADOPT_FOREIGN off)
        self._adoption = adoption
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._reconcile_interval = reconcile_interval
        self._pending: dict[str, TaskUpdate] = {}
        #: tasks whose states the state feed writes (an ordered set, oldest first)
        self._fed: OrderedDict[str, None] = OrderedDict()
        #: pending tasks whose update came from pub/sub only (the feed may take it over)
        self._published: set[str] = set()
        self._wake = asyncio.Event()
        self._reconcile_now = asyncio.Event()

    def record(self, update: TaskUpdate) -> None:
        """Queue an update read from Redis (a status read's refresh, a reconcile) for
        writing; never blocks.

        Of a task the state feed writes (marked ``in_feed``, or ``fed``) only a terminal
        state is queued: the feed writes every state, and a state read from Redis a moment
        ago may already be older than one the feed has written since; written after it, it
        would take the record back (a further progress replaced by an earlier one, and a
        final progress lost when the terminal state, which carries none, follows). A
        terminal state cannot take anything back (the record then takes only a further
        progress).
        """
        if not update.state.terminal and self._left_to_feed(update):
            return
        self._published.discard(update.task_id)
        self._queue(update)

    def record_published(self, update: TaskUpdate) -> None:
        """``record`` for an update pub/sub brought; left to the state feed when the feed
        carries it (``in_feed``, or the task is ``fed``). Never blocks."""
        if self._left_to_feed(update):
            return
        if update.task_id not in self._pending:
            self._published.add(update.task_id)
        self._queue(update)

    def _left_to_feed(self, update: TaskUpdate) -> bool:
        """Whether this process's state feed writes ``update`` (or a newer state of its task)."""
        return (self._feed and update.in_feed) or update.task_id in self._fed

    def fed(self, task_ids: Iterable[str]) -> None:
        """Note tasks the state feed has read: it writes their states, so their pub/sub
        updates, pending or to come, are not written here as well.

        Every state a feed worker publishes is in the feed before it is published (one
        MULTI), so a dropped pub/sub update is never the only copy. A task run again by a
        worker without the feed (a mixed fleet) is then recorded by the reconcile only.
        """
        fed, published = self._fed, self._published
        for task_id in task_ids:
            fed[task_id] = None
            fed.move_to_end(task_id)
            if task_id in published:
                published.discard(task_id)
                self._pending.pop(task_id, None)
        while len(fed) > FED_MEMORY:
            fed.popitem(last=False)

    def _queue(self, update: TaskUpdate) -> None:
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
            self._published.difference_update(ids)
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
            await self._apply(batch)
            telemetry.states_written(batch)
            return
        except Unavailable:
            raise
        except Exception:  # noqa: BLE001 - whatever the database refused, isolate it
            log.warning("recorder: a batch of %d was refused; writing one at a time", len(batch))
        for update in batch:
            try:
                await self._apply([update])
            except Unavailable:
                raise
            except Exception:
                log.exception(
                    "task_id=%s: the database refused this %s update; dropped", update.task_id, update.state
                )
            else:
                telemetry.states_written([update])

    async def _apply(self, batch: list[TaskUpdate]) -> None:
        if self._adoption is not None:
            await self._adoption.adopt(batch)
        await self._store.apply_updates(batch)

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

    async def reconcile(self, hub: ProgressHub, limit: int | None = None) -> int:
        """One reconcile pass over every unfinished task; returns how many updates it found.

        The tasks are walked in pages of ``RECONCILE_PAGE`` by ``(update_time, task_id)``
        (a keyset, so any number of long-dead leftovers cannot hide a later task), up to the
        tasks last updated when the pass began. Their states are read from Redis
        ``RECONCILE_CHUNK`` at a time: one MGET of 1,000 states and their decoding held the
        event loop for about 20 ms (measured with 10,000 streams open); between chunks the
        loop serves everything else while the next MGET is in flight.

        Args:
            hub: reads the states from Redis.
            limit: stop after this many tasks (None: every unfinished task).
        """
        started = dt.datetime.now(dt.UTC)
        after: ActiveKey | None = None
        found = seen = 0
        while limit is None or seen < limit:
            size = RECONCILE_PAGE if limit is None else min(RECONCILE_PAGE, limit - seen)
            page = await self._store.active_page(after, size, updated_before=started)
            for start in range(0, len(page), RECONCILE_CHUNK):
                updates = await hub.snapshots([key.task_id for key in page[start : start + RECONCILE_CHUNK]])
                for update in updates:
                    self.record(update)  # of a fed task, only a terminal state (``record``)
                found += len(updates)
            seen += len(page)
            if len(page) < size:
                break
            after = page[-1]
        return found
