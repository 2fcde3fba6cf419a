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
atomic; see ``service.broker.inspect``). Decided only on passes where every worker with a
fresh heartbeat answered: silence is not "not held". A lost message is not republished
while a live worker says it holds the task (its STARTED went with Redis: it runs, and would
run twice), nor while a live worker is silent.

**Runs no live worker holds** (Redis broker only). A task RUNNING on a worker whose
heartbeat is fine, with no update for ``lost_after`` seconds, that its worker answers
``query_task`` about without holding it (and no other worker holds), on two consecutive
passes, with the state feed read and acknowledged up to the first of them: its run ended
and the gateway missed how (Redis restarted empty between the write and the read, or the
worker restarted under the same name). A result document in Redis (final, or RETRY) is
the truth and is applied; a run claim marked ``done`` without one means the run ended in an
unknown way and nothing is decided; otherwise the task is re-run (opted in) or ends FAILED
``WorkerLost``, as above. A worker that does not answer decides nothing: a long run on a
live worker is never touched.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from service.domain.catalog import Catalog
from service.domain.model import TaskError, TaskState, TaskUpdate
from service.store.recovery import LostCandidate, StaleRun

if TYPE_CHECKING:
    from service.broker.inspect import Taken
    from service.results.recovery import StoredResult, StreamId

log = logging.getLogger(__name__)

#: The error type of a task that ended because its worker stopped heartbeating.
WORKER_LOST = "WorkerLost"
#: Tasks handled per worker or per broker check in one pass.
PASS_LIMIT = 1000


class RecoveryStorePort(Protocol):
    """What the pass reads and writes in the database (``service.store.recovery``)."""

    async def running_workers(self) -> set[str]: ...
    async def saw_heartbeats(self, hostnames: Collection[str], now: dt.datetime) -> None: ...
    async def known_workers(self) -> set[str]: ...
    async def watched(self, hostnames: Collection[str]) -> set[str]: ...
    async def running_on(self, worker: str, limit: int) -> list[LostCandidate]: ...
    async def requeue(
        self,
        task_ids: Iterable[str],
        worker: str,
        now: dt.datetime,
        updated_before: dt.datetime | None = None,
    ) -> list[str]: ...
    async def fail(
        self,
        task_ids: Iterable[str],
        worker: str,
        error: TaskError,
        now: dt.datetime,
        updated_before: dt.datetime | None = None,
    ) -> int: ...
    async def stale_running(self, updated_before: dt.datetime, limit: int) -> list[StaleRun]: ...
    async def settle(self, updates: Iterable[TaskUpdate]) -> int: ...
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
    async def results(self, task_ids: Collection[str]) -> dict[str, StoredResult]: ...
    async def republish(self, stored: Iterable[StoredResult]) -> None: ...
    async def finished_claims(self, runs: Mapping[str, int]) -> set[str]: ...
    async def forget_runs(self, runs: Mapping[str, int]) -> None: ...
    async def feed_mark(self) -> StreamId | None: ...
    async def feed_settled(self, mark: StreamId | None) -> bool: ...
    async def aclose(self) -> None: ...


class BrokerPort(Protocol):
    """Which task ids the broker holds (``service.broker.inspect``)."""

    async def held(self, queues: Iterable[str], wanted: Collection[str]) -> set[str] | None: ...
    async def taken(self, wanted: Collection[str], before: float) -> dict[str, Taken] | None: ...
    async def answers(self, task_ids: Collection[str]) -> dict[str, set[str]] | None: ...
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
        #: RUNNING tasks their live worker did not hold on the last pass, and the state
        #: feed's latest entry when it was asked
        self._unheld: set[str] = set()
        self._mark: StreamId | None = None
        #: runs that ended (claim done) with no result found, already logged
        self._unknown: set[str] = set()
        if broker is None:
            log.info("recovery: the broker is not Redis; tasks lost by the broker are not looked for")

    async def step(self) -> float:
        """One pass: tasks lost with their worker, then tasks lost by the broker."""
        await self.lost_workers(dt.datetime.now(dt.UTC))
        if self._broker is not None:
            await self.lost_messages(dt.datetime.now(dt.UTC))
            await self.lost_runs(dt.datetime.now(dt.UTC))
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
            # requeue first: of two replicas deciding the same, only the one whose write
            # changed the row forgets the dead run's document
            changed = await self._store.requeue(rerun, worker, now)
            await self._results.forget(changed)
            log.warning(
                "recovery: worker %s lost; %d task(s) republished: %s",
                worker,
                len(changed),
                " ".join(changed),
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
        running = await self._live_holders(confirmed, set()) if confirmed else set()
        if running is None:  # a live worker did not answer: keep them suspects, decide later
            self._suspects = missing
            return []
        self._suspects = missing - set(confirmed)
        if running:
            log.warning(
                "recovery: %d task(s) the broker lost are running on a live worker; not republished: %s",
                len(running),
                " ".join(sorted(running)),
            )
            confirmed = [task_id for task_id in confirmed if task_id not in running]
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
        holding = await self._live_holders(taken, None) if taken else set()
        if holding is None:
            self._orphans = set()  # two passes in a row, each with every live worker's answer
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

    async def _live_holders(self, task_ids: Collection[str], cannot_ask: set[str] | None) -> set[str] | None:
        """Those of ``task_ids`` a live worker holds, as ``query_task`` answers say; None
        when that is not known: a worker with a fresh heartbeat did not answer (loaded, main
        loop stalled), so nobody's silence may be read as "not held" this pass.
        ``cannot_ask`` when the inspector cannot ask (no Celery app)."""
        assert self._broker is not None
        answers = await self._broker.answers(task_ids)
        if answers is None:
            return cannot_ask
        live = await self._results.alive(await self._store.known_workers())
        silent = sorted(live - set(answers))
        if silent:
            log.debug(
                "recovery: live worker(s) %s did not answer query_task; nothing decided for %d task(s)",
                " ".join(silent),
                len(task_ids),
            )
            return None
        return set().union(*answers.values())

    async def lost_runs(self, now: dt.datetime) -> list[str]:
        """Settle the RUNNING tasks of live workers that no worker holds any more (see the
        module docstring); returns the ids re-run or failed."""
        assert self._broker is not None
        settled = bool(self._unheld) and await self._results.feed_settled(self._mark)
        cutoff = now - dt.timedelta(seconds=self._settings.lost_after)
        stale = await self._store.stale_running(cutoff, PASS_LIMIT)
        alive = await self._results.alive({run.worker for run in stale}) if stale else set()
        runs = {run.task_id: run for run in stale if run.worker in alive}
        answers = await self._broker.answers(runs) if runs else None
        if answers is None:
            self._unheld = set()
            return []
        held = set().union(*answers.values())
        unheld = {task_id for task_id, run in runs.items() if run.worker in answers and task_id not in held}
        unheld -= await self._settle(unheld)
        unheld -= self._ended(await self._results.finished_claims({i: runs[i].retries for i in unheld}))
        mark = await self._results.feed_mark()
        confirmed = sorted(unheld & self._unheld) if settled else []
        self._unheld, self._mark = unheld - set(confirmed), mark
        for worker in sorted({runs[task_id].worker for task_id in confirmed}):
            mine = [runs[task_id] for task_id in confirmed if runs[task_id].worker == worker]
            await self._lost_runs(mine, cutoff, now)
        return confirmed

    async def _settle(self, task_ids: Collection[str]) -> set[str]:
        """Apply the stored results (final or RETRY) of ``task_ids``; returns their ids."""
        stored = await self._results.results(task_ids)
        found = [item for item in stored.values() if item.update.state is not TaskState.RUNNING]
        if found:
            count = await self._store.settle(item.update for item in found)
            await self._results.republish(found)
            ids = " ".join(sorted(item.update.task_id for item in found))
            log.warning(
                "recovery: %d result(s) found in Redis for runs no worker holds, applied: %s", count, ids
            )
        return {item.update.task_id for item in found}

    def _ended(self, task_ids: set[str]) -> set[str]:
        """Log (once) the runs that ended with no result found; returns them."""
        new = sorted(task_ids - self._unknown)
        self._unknown = set(task_ids)
        if new:
            log.warning(
                "recovery: %d run(s) ended (claim done) but no result is stored; left to the feed "
                "and the reconcile: %s",
                len(new),
                " ".join(new),
            )
        return task_ids

    async def _lost_runs(self, runs: list[StaleRun], cutoff: dt.datetime, now: dt.datetime) -> None:
        """Re-run or fail tasks whose live worker (one for all of ``runs``) no longer holds
        them, unless updated since ``cutoff``."""
        worker = runs[0].worker
        rerun = {run.task_id: run.retries for run in runs if self._catalog.acks_late(run.task_name)}
        if rerun:
            # requeue first, then forget only what this replica changed: another replica's
            # later identical decision changes no row and so never deletes the claim of the
            # re-run its twin already published
            changed = await self._store.requeue(rerun, worker, now, updated_before=cutoff)
            await self._results.forget_runs({task_id: rerun[task_id] for task_id in changed})
            log.warning(
                "recovery: %d task(s) worker %s no longer holds, no result stored, republished: %s",
                len(changed),
                worker,
                " ".join(changed),
            )
        error = TaskError(
            WORKER_LOST, f"worker {worker} no longer holds the task and no result was stored for it"
        )
        ended = []
        for run in runs:
            if run.task_id not in rerun and await self._store.fail([run.task_id], worker, error, now, cutoff):
                ended.append(run.task_id)
        if ended:
            await self._results.announce_failed(ended, error, now)
            log.warning(
                "recovery: %d task(s) worker %s no longer holds, no result stored, FAILED WorkerLost: %s",
                len(ended),
                worker,
                " ".join(ended),
            )

    async def aclose(self) -> None:
        """Release the result backend's and the broker's connections."""
        await self._results.aclose()
        if self._broker is not None:
            await self._broker.aclose()
