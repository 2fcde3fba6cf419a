"""The control use cases: cancel a task, list tasks, wait for one. No gRPC, SQL or Redis.

Each talks to its own small ports (``ListingPort``, ``CancelPort``, ``CancelSignalsPort``);
``service/app.py`` wires the store's and the broker's implementations in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Protocol

from service.domain.callers import OPEN, Caller
from service.domain.errors import LimitExceeded, PermissionDenied, ResultBackendUnavailable, TaskNotFound
from service.domain.model import TaskRecord, TaskState, apply_update
from service.domain.query import PageKey, TaskQuery
from service.results.hub import ProgressHub
from service.results.recorder import Recorder
from service.usecases.tasks import Gateway

log = logging.getLogger(__name__)

#: Seconds WaitTask waits when the caller gives no timeout.
DEFAULT_WAIT = 60.0
#: Result-backend states that say a worker has started the task.
_STARTED = frozenset({TaskState.RUNNING, TaskState.RETRYING})


class ListingPort(Protocol):
    """Pages of tasks (``service.store.listing.TaskListing``)."""

    async def page(self, query: TaskQuery, now: dt.datetime) -> list[TaskRecord]:
        """Up to ``query.limit`` tasks matching ``query``, in its order, after its key."""
        ...


class CancelPort(Protocol):
    """The cancel request's record (``service.store.cancel.CancelStore``)."""

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task with its cancel mark, or None."""
        ...

    async def cancel(self, task_id: str, now: dt.datetime, *, not_started: bool) -> TaskRecord | None:
        """Record the request; end at once a task that cannot have started."""
        ...


class CancelSignalsPort(Protocol):
    """The worker-side effects of a cancel (``service.broker.control.CancelSignals``)."""

    async def mark(self, task_id: str, reason: str) -> None:
        """Set the durable cancellation mark workers check."""
        ...

    async def announce_cancelled(self, task_id: str, reason: str, when: dt.datetime) -> None:
        """Publish a REVOKED document for a task no worker will see."""
        ...

    async def revoke(self, task_id: str, *, terminate: bool) -> None:
        """Broadcast Celery's revoke (best effort)."""
        ...

    async def aclose(self) -> None:
        """Release the connections."""
        ...


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, and where the next starts (None: this is the last)."""

    tasks: list[TaskRecord]
    next_key: PageKey | None


class Control:
    """Cancels, lists and waits for tasks."""

    def __init__(
        self,
        gateway: Gateway,
        listing: ListingPort,
        cancels: CancelPort,
        signals: CancelSignalsPort,
        hub: ProgressHub,
        recorder: Recorder,
    ) -> None:
        self._gateway = gateway
        self._listing = listing
        self._cancels = cancels
        self._signals = signals
        self._hub = hub
        self._recorder = recorder

    async def aclose(self) -> None:
        """Release the cancel signals' connections."""
        await self._signals.aclose()

    async def list_tasks(self, query: TaskQuery, caller: Caller = OPEN) -> Page:
        """One page of the tasks ``caller`` may read (only its own without ``read_all``).

        Raises:
            DatabaseUnavailable: the database is unreachable.
        """
        owner = None if caller.read_all else caller.name
        now = dt.datetime.now(dt.UTC)
        rows = await self._listing.page(dataclasses.replace(query, owner=owner, limit=query.limit + 1), now)
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        next_key = PageKey(rows[-1].create_time, rows[-1].task_id) if more and rows else None
        return Page([row.as_of(now) for row in rows], next_key)

    async def wait(
        self, task_id: str, caller: Caller = OPEN, *, timeout: float | None, lifetime: float
    ) -> TaskRecord:
        """The task once terminal, or as it is after ``timeout`` seconds (None: the default
        60 s; never longer than ``lifetime``). Follows the shared subscription (the
        gateway's watch), it does not poll.

        Raises:
            TaskNotFound: no such task, or ``caller`` may not read it.
            ShuttingDown: the server is stopping.
        """
        seconds = min(timeout or DEFAULT_WAIT, lifetime)
        last: TaskRecord | None = None
        watch = self._gateway.watch(task_id, caller, lifetime=seconds)
        async with contextlib.aclosing(watch) as records:
            try:
                async for record in records:
                    last = record
            except LimitExceeded:
                pass  # the wait is over: the task as it is now
        if last is None:  # pragma: no cover - a watch yields its snapshot before anything else
            raise TaskNotFound(f"no task with id {task_id!r} was enqueued through this gateway")
        return last

    async def cancel(
        self, task_id: str, caller: Caller = OPEN, *, terminate: bool = False, reason: str = ""
    ) -> TaskRecord:
        """Record a cancel request and carry it out; returns the task after it.

        A finished task is returned unchanged. Otherwise the durable mark is set first (so
        any worker that has not yet started the task will skip it), then the result
        backend is read: a task it shows no start of becomes CANCELLED at once; a running
        one keeps its state with ``cancel_requested`` (cooperative; ``terminate`` signals
        its worker process). Celery's broadcast revoke is sent as well.

        Raises:
            TaskNotFound: no such task, or ``caller`` may not read it.
            PermissionDenied: ``caller`` may not enqueue the task's name.
            ResultBackendUnavailable: Redis is unreachable; nothing was recorded (retry).
            DatabaseUnavailable: the database is unreachable (retry: cancel is idempotent).
        """
        record = await self._cancels.get(task_id)
        if record is None or not caller.may_read(record.caller):
            raise TaskNotFound(f"no task with id {task_id!r} was enqueued through this gateway")
        if not caller.may_enqueue(record.task_name):
            raise PermissionDenied(f"caller {caller.name!r} may not cancel {record.task_name!r} tasks")
        now = dt.datetime.now(dt.UTC)
        if record.state.terminal:
            return record
        await self._signals.mark(task_id, reason)
        started, finished = await self._worker_view(record)
        if finished is not None:
            return finished  # it ended before the request: its true state
        after = await self._cancels.cancel(task_id, now, not_started=not started)
        if after is None:
            raise TaskNotFound(f"no task with id {task_id!r} was enqueued through this gateway")
        if after.state is TaskState.CANCELLED:
            log.info("task_id=%s cancelled before it started", task_id)
            await self._signals.announce_cancelled(task_id, reason, now)
        else:
            log.info("task_id=%s cancel requested (terminate=%s)", task_id, terminate)
        await self._signals.revoke(task_id, terminate=terminate and started)
        return after.as_of(now)

    async def _worker_view(self, record: TaskRecord) -> tuple[bool, TaskRecord | None]:
        """Whether the result backend shows the task started (True when Redis cannot say),
        and the task as it ended there if it already finished."""
        try:
            update = await self._hub.snapshot(record.task_id)
        except ResultBackendUnavailable:
            return True, None
        if update is None:
            return False, None
        if update.state.terminal:
            self._recorder.record(update)
            return True, apply_update(record, update)
        return update.state in _STARTED, None
