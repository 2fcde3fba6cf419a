"""Operators' use cases: queues, workers, the outbox gauges, and retention.

ListQueues and ListWorkers show the whole fleet, so only callers with ``read_all`` may ask.
Two background loops (started by ``service/app.py``): ``gauge_step`` refreshes the outbox
and held-task gauges (metrics on only), ``retention_step`` deletes terminal tasks older than
the retention in batches of ``RETENTION_BATCH``, walking the retention index forward within
a pass, with a pause after each batch of at least ``RETENTION_SLOWDOWN`` times what it took,
so a backlog of a million rows never holds the table, the database or the event loop for long.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from service.broker.fleet import QueueDepths, WorkerInspector, WorkerSnapshot
from service.broker.redis_message import DEFAULT_QUEUE
from service.domain.callers import Caller
from service.domain.errors import PermissionDenied
from service.runtime import telemetry
from service.store.operations import OperationsStore

log = logging.getLogger(__name__)

#: Rows deleted per retention statement.
RETENTION_BATCH = 1000
#: Seconds between two retention batches while there is more to delete, at least …
RETENTION_PAUSE = 0.05
#: … and at least this many times what the batch took: retention holds a database
#: connection at most a quarter of the time, and a busy database slows it down.
RETENTION_SLOWDOWN = 3.0
#: Seconds between retention passes once nothing is left to delete.
RETENTION_INTERVAL = 60.0
#: Seconds between refreshes of the outbox gauges.
GAUGE_INTERVAL = 15.0


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """One queue: messages in the broker, and recorded unfinished tasks."""

    name: str
    broker_messages: int = 0
    queued: int = 0
    scheduled: int = 0
    running: int = 0


@dataclass(slots=True)
class _Pass:
    """A retention pass: batch after batch until one comes back short."""

    started: float = field(default_factory=time.monotonic)
    deleted: int = 0
    #: the cut-off of the latest batch (moves on with the clock)
    before: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    #: where the next batch starts in the retention index (the newest time deleted so far)
    since: dt.datetime | None = None


class Operations:
    """Queues, workers, gauges and retention."""

    def __init__(
        self,
        store: OperationsStore,
        depths: QueueDepths | None,
        inspector: WorkerInspector,
        *,
        retention: float = 30 * 86400.0,
    ) -> None:
        self._store = store
        self._depths = depths
        self._inspector = inspector
        self._retention = retention
        #: the retention pass under way (None between passes)
        self._pass: _Pass | None = None

    async def list_queues(self, caller: Caller) -> list[QueueInfo]:
        """Every queue with recorded unfinished tasks or broker messages, by name.

        Raises:
            PermissionDenied: the caller lacks read_all.
            DatabaseUnavailable, BrokerUnavailable: a dependency is down.
        """
        _check(caller, "ListQueues")
        counts = {c.queue or DEFAULT_QUEUE: c for c in await self._store.queue_counts()}
        depths = {} if self._depths is None else await self._depths.depths(sorted(counts))
        infos = []
        for name in sorted({*counts, *depths}):
            recorded = counts.get(name)
            messages = depths.get(name, 0)
            if recorded is None and not messages:
                continue
            infos.append(
                QueueInfo(name, messages)
                if recorded is None
                else QueueInfo(name, messages, recorded.queued, recorded.scheduled, recorded.running)
            )
        return infos

    async def list_workers(self, caller: Caller) -> list[WorkerSnapshot]:
        """The workers answering Celery's remote control (empty when none does).

        Raises:
            PermissionDenied: the caller lacks read_all.
            BrokerUnavailable: the broker is down.
        """
        _check(caller, "ListWorkers")
        return await self._inspector.workers()

    async def gauge_step(self) -> float:
        """Refresh the outbox gauges (one round; run it supervised)."""
        metrics = telemetry.current
        if metrics is not None:
            counts = await self._store.outbox_counts(dt.datetime.now(dt.UTC))
            metrics.outbox_pending.set(counts.pending)
            metrics.held_tasks.set(counts.held)
            queues = await self._store.queue_counts()
            metrics.queue_tasks.clear()
            for q in queues:
                for state, count in (
                    ("QUEUED", q.queued),
                    ("SCHEDULED", q.scheduled),
                    ("RUNNING", q.running),
                ):
                    metrics.queue_tasks.labels(q.queue or DEFAULT_QUEUE, state).set(count)
        return GAUGE_INTERVAL

    async def retention_step(self) -> float:
        """Delete one batch of expired terminal tasks; returns the wait before the next."""
        if self._retention <= 0:
            return RETENTION_INTERVAL
        run = self._pass or _Pass()
        more, pause = await self._delete_batch(run)
        if more:
            self._pass = run
            return pause
        self._pass = None
        if run.deleted:
            log.info(
                "retention: deleted %d tasks finished before %s in %.1fs",
                run.deleted, run.before.isoformat(timespec="seconds"), time.monotonic() - run.started,
            )  # fmt: skip
        return RETENTION_INTERVAL

    async def purge(self) -> int:
        """Delete every expired terminal task now (batch by batch); returns how many."""
        run = _Pass()
        while self._retention > 0:
            more, pause = await self._delete_batch(run)
            if not more:
                break
            await asyncio.sleep(pause)
        return run.deleted

    async def _delete_batch(self, run: _Pass) -> tuple[bool, float]:
        """One batch of ``run``: (whether more may be left, the pause before the next)."""
        run.before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self._retention)
        started = time.monotonic()
        batch = await self._store.delete_finished(run.before, RETENTION_BATCH, since=run.since)
        took = time.monotonic() - started
        run.deleted += batch.count
        run.since = batch.newest or run.since
        return batch.count >= RETENTION_BATCH, max(RETENTION_PAUSE, RETENTION_SLOWDOWN * took)

    async def aclose(self) -> None:
        """Release the broker connections."""
        if self._depths is not None:
            await self._depths.aclose()
        await self._inspector.aclose()


def _check(caller: Caller, what: str) -> None:
    if not caller.read_all:
        raise PermissionDenied(f"caller {caller.name!r} may not call {what}: it needs read_all")
