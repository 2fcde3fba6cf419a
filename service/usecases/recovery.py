"""Lost work is detected, not waited for: the recovery pass (one round every few seconds).

**Tasks lost with their worker.** A RUNNING task records the worker (Celery node name) that
started it. A worker running the taskgate library keeps a heartbeat key alive; once any
gateway of the deployment has seen a worker's heartbeat, that worker is *watched*. When a
watched worker's heartbeat has been missing on every check for ``lost_timeout`` seconds,
each task still RUNNING on it is

- put back in the outbox (QUEUED, a fresh publish mark) when the task opted in to re-runs
  (``acks_late`` in the catalog): the new delivery runs, the run-once guard letting it
  through because the claim's owner is dead; or else
- ended FAILED with error type ``WorkerLost`` and a message naming the worker.

A worker that never heartbeated (no taskgate library) is never declared lost: its tasks
keep today's behaviour. How long a key has been missing is measured by this process (from
its first check that found it missing), so a gateway restarted after a worker died takes
``lost_timeout`` from its first pass; a Redis outage is no evidence either way (the pass
fails and decides nothing).

**Tasks lost by the broker** (Redis broker only). A QUEUED or due SCHEDULED task published
more than ``lost_after`` seconds ago, that no worker has written anything for, and whose
message is neither in its queue's lists nor in the unacked hash, on two consecutive passes,
is put back in the outbox. Two passes, because a message moves from the queue to the
unacked hash (and is acked before STARTED) while the broker is read.

**Messages prefetched by a dead worker** (Redis broker only). Such a task is QUEUED and its
message sits in kombu's unacked hash, which does not say which consumer took it; kombu
would restore it only after the visibility timeout (an hour by default). A waiting task as
above whose message was taken more than ``lost_after`` seconds ago and that no live worker
holds (Celery's ``query_task`` broadcast: reserved, scheduled or active), on two
consecutive passes, has its message moved back to the head of its queue (compare-and-move,
atomic; see ``service.broker.inspect``). A live worker that did not answer in time keeps its
copy: the task is then delivered twice and the run-once guard lets only one delivery run.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from service.domain.catalog import Catalog
from service.domain.model import TaskError
from service.store.recovery import LostCandidate

if TYPE_CHECKING:
    from service.broker.inspect import Taken

log = logging.getLogger(__name__)

#: The error type of a task that ended because its worker stopped heartbeating.
WORKER_LOST = "WorkerLost"
#: Tasks handled per worker or per broker check in one pass.
PASS_LIMIT = 1000


class RecoveryStorePort(Protocol):
    """What the pass reads and writes in the database (``service.store.recovery``)."""

    async def running_workers(self) -> set[str]: ...
    async def saw_heartbeats(self, hostnames: Collection[str], now: dt.datetime) -> None: ...
    async def watched(self, hostnames: Collection[str]) -> set[str]: ...
    async def running_on(self, worker: str, limit: int) -> list[LostCandidate]: ...
    async def requeue(self, task_ids: Iterable[str], worker: str, now: dt.datetime) -> int: ...
    async def fail(self, task_ids: Iterable[str], worker: str, error: TaskError, now: dt.datetime) -> int: ...
    async def waiting(self, published_before: dt.datetime, limit: int) -> list[LostCandidate]: ...
    async def republish(
        self, task_ids: Iterable[str], published_before: dt.datetime, now: dt.datetime
    ) -> int: ...


class ResultKeysPort(Protocol):
    """What the pass reads and writes on the result backend (``service.results.recovery``)."""

    async def alive(self, hostnames: Collection[str]) -> set[str]: ...
    async def reported(self, task_ids: Collection[str]) -> set[str]: ...
    async def forget(self, task_ids: Collection[str]) -> None: ...
    async def announce_failed(
        self, task_ids: Collection[str], error: TaskError, now: dt.datetime
    ) -> None: ...
    async def aclose(self) -> None: ...


class BrokerPort(Protocol):
    """Which task ids the broker holds (``service.broker.inspect``)."""

    async def held(self, queues: Iterable[str], wanted: Collection[str]) -> set[str] | None: ...
    async def taken(self, wanted: Collection[str], before: float) -> dict[str, Taken] | None: ...
    async def holders(self, task_ids: Collection[str]) -> set[str] | None: ...
    async def restore(self, taken: Taken, queue: str) -> bool: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class RecoverySettings:
    """Seconds: between passes, a watched worker's heartbeat missing before its tasks are
    lost, and a published task unseen before the broker is asked about it."""

    interval: float = 15.0
    lost_timeout: float = 60.0
    lost_after: float = 60.0


class Recovery:
    """The recovery pass (see the module docstring); ``step`` is one round, run supervised."""

    def __init__(
        self,
        store: RecoveryStorePort,
        results: ResultKeysPort,
        broker: BrokerPort | None,
        catalog: Catalog,
        settings: RecoverySettings = RecoverySettings(),
    ) -> None:
        self._store = store
        self._results = results
        self._broker = broker
        self._catalog = catalog
        self._settings = settings
        #: first check that found a watched worker's heartbeat missing, per worker
        self._missing: dict[str, dt.datetime] = {}
        #: tasks the broker did not hold on the last pass
        self._suspects: set[str] = set()
        #: tasks taken from the broker long ago that no live worker held on the last pass
        self._orphans: set[str] = set()
        if broker is None:
            log.info("recovery: the broker is not Redis; tasks lost by the broker are not looked for")

    async def step(self) -> float:
        """One pass: tasks lost with their worker, then tasks lost by the broker."""
        await self.lost_workers(dt.datetime.now(dt.UTC))
        if self._broker is not None:
            await self.lost_messages(dt.datetime.now(dt.UTC))
        return self._settings.interval

    async def lost_workers(self, now: dt.datetime) -> list[str]:
        """Recover the tasks of every watched worker gone for ``lost_timeout``; returns them."""
        running = await self._store.running_workers()
        alive = await self._results.alive(running)
        await self._store.saw_heartbeats(alive, now)
        silent = await self._store.watched(running - alive)
        self._missing = {name: since for name, since in self._missing.items() if name in silent}
        timeout = dt.timedelta(seconds=self._settings.lost_timeout)
        lost = []
        for name in sorted(silent):
            since = self._missing.setdefault(name, now)
            if now - since >= timeout:
                lost.append(name)
        for name in lost:
            await self._recover(name, now)
        return lost

    async def _recover(self, worker: str, now: dt.datetime) -> None:
        """Re-run or fail every task still RUNNING on the lost ``worker``."""
        tasks = await self._store.running_on(worker, PASS_LIMIT)
        rerun = [task.task_id for task in tasks if self._catalog.acks_late(task.task_name)]
        ended = [task.task_id for task in tasks if not self._catalog.acks_late(task.task_name)]
        if rerun:
            await self._results.forget(rerun)
            count = await self._store.requeue(rerun, worker, now)
            log.warning(
                "recovery: worker %s lost; %d task(s) republished: %s", worker, count, " ".join(rerun)
            )
        if ended:
            error = TaskError(WORKER_LOST, f"worker {worker} stopped heartbeating while running the task")
            count = await self._store.fail(ended, worker, error, now)
            await self._results.announce_failed(ended, error, now)
            log.warning(
                "recovery: worker %s lost; %d task(s) FAILED WorkerLost: %s", worker, count, " ".join(ended)
            )

    async def lost_messages(self, now: dt.datetime) -> list[str]:
        """Republish the waiting tasks the broker no longer holds (two passes in a row);
        returns their ids."""
        assert self._broker is not None
        cutoff = now - dt.timedelta(seconds=self._settings.lost_after)
        candidates = await self._store.waiting(cutoff, PASS_LIMIT)
        ids = {task.task_id for task in candidates}
        ids -= await self._results.reported(ids)
        if not ids:
            self._suspects, self._orphans = set(), set()
            return []
        held = await self._broker.held({task.queue for task in candidates if task.task_id in ids}, ids)
        if held is None:
            return []
        queues = {task.task_id: task.queue for task in candidates}
        await self.orphaned(ids & held, queues, now)
        missing = ids - held
        confirmed = sorted(missing & self._suspects)
        self._suspects = missing - set(confirmed)
        if confirmed:
            count = await self._store.republish(confirmed, cutoff, now)
            log.warning(
                "recovery: %d task(s) the broker no longer holds republished: %s", count, " ".join(confirmed)
            )
        return confirmed

    async def orphaned(self, ids: Collection[str], queues: dict[str, str], now: dt.datetime) -> list[str]:
        """Restore the messages of ``ids`` (waiting tasks the broker holds) taken more than
        ``lost_after`` ago that no live worker holds (two passes in a row); returns their
        ids. ``queues`` names each task's queue."""
        assert self._broker is not None
        before = (now - dt.timedelta(seconds=self._settings.lost_after)).timestamp()
        taken = await self._broker.taken(ids, before) if ids else {}
        if taken is None:
            return []
        holding = await self._broker.holders(taken) if taken else set()
        if holding is None:
            return []
        orphans = set(taken) - holding
        confirmed = sorted(orphans & self._orphans)
        self._orphans = orphans - set(confirmed)
        restored = [
            task_id for task_id in confirmed if await self._broker.restore(taken[task_id], queues[task_id])
        ]
        if restored:
            log.warning(
                "recovery: %d message(s) taken by a worker that is gone restored to their queue: %s",
                len(restored),
                " ".join(restored),
            )
        return restored

    async def aclose(self) -> None:
        """Release the result backend's and the broker's connections."""
        await self._results.aclose()
        if self._broker is not None:
            await self._broker.aclose()
