"""The use cases: enqueue a task, read it, watch it. No gRPC, SQL or Celery here."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.broker.outbox import Outbox
from service.domain.callers import OPEN, Caller
from service.domain.catalog import Catalog
from service.domain.errors import (
    InvalidRequest,
    InvalidTasks,
    LimitExceeded,
    PermissionDenied,
    ResultBackendUnavailable,
    ShuttingDown,
    TaskNotFound,
    Unavailable,
)
from service.domain.model import Delivery, TaskRecord, TaskSpec, TaskState, apply_update
from service.results.hub import ProgressHub, Signal
from service.results.recorder import Recorder
from service.runtime import telemetry, tracing
from service.store.tasks import NewTask, TaskStore

if TYPE_CHECKING:
    from service.usecases.control import Control

log = logging.getLogger(__name__)

#: A held task becomes publishable once its run_time is this close (the schedule horizon,
#: at least this lead), and is published with a Celery eta: a burst of tasks due at the
#: same moment has the whole horizon to reach the broker.
DISPATCH_LEAD = dt.timedelta(seconds=2)
#: Tasks of a batch checked between two yields to the event loop. The batches in flight
#: each run a slice in the same turn of the loop: at 100 per slice, 4 batches in flight
#: held it up to 17 ms on this 2-core machine; at 50, 10 ms (at 25 the batches took turns
#: so often that throughput fell by a quarter).
YIELD_EVERY = 50


@dataclass(frozen=True, slots=True)
class Accepted:
    """The answer to an enqueue."""

    task_id: str
    state: TaskState
    deduplicated: bool


@dataclass(frozen=True, slots=True)
class Limits:
    """Scheduling limits."""

    schedule_horizon: dt.timedelta = dt.timedelta(seconds=300)
    max_schedule: dt.timedelta = dt.timedelta(days=365)
    #: Seconds between re-reads of a watched task while the progress subscription is down
    #: (while it is up, every change arrives through it).
    watch_recheck: float = 15.0


class Gateway:
    """Enqueues, reads and watches tasks."""

    def __init__(
        self,
        store: TaskStore,
        catalog: Catalog,
        outbox: Outbox,
        hub: ProgressHub,
        recorder: Recorder,
        limits: Limits | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._outbox = outbox
        self._hub = hub
        self._recorder = recorder
        self._limits = limits or Limits()
        #: cancel, list and wait (``service.usecases.control``), attached by ``service/app.py``
        self.control: Control | None = None

    async def enqueue(self, spec: TaskSpec, caller: Caller = OPEN) -> Accepted:
        """Validate, record durably, and hand to the outbox.

        Args:
            spec: The task to enqueue.
            caller: Who asks; its name is recorded with the task (request_id is unique per caller).

        Raises:
            PermissionDenied: the caller may not enqueue this task name (nothing is recorded).
            InvalidRequest: unknown task, arguments that do not bind, times out of range.
            RequestIdConflict: request_id reused for another request.
            DatabaseUnavailable: nothing was recorded.
        """
        now = dt.datetime.now(dt.UTC)
        new = self._prepare(spec, caller, now)
        await self._outbox.room()
        original = await self._store.insert(new)
        if original is not None:
            log.info("task_id=%s request_id=%s deduplicated", original.task_id, spec.request_id)
            current = await self._refresh(original)
            return Accepted(original.task_id, current.as_of(now).state, deduplicated=True)
        if not new.held:
            self._outbox.submit(new.delivery)
        if (metrics := telemetry.current) is not None:
            metrics.task_enqueued(new.task_id, new.delivery.task_name, now)
        return Accepted(new.task_id, new.state, deduplicated=False)

    async def enqueue_batch(
        self, specs: Sequence[Callable[[], TaskSpec]], caller: Caller = OPEN, *, request_id: str = ""
    ) -> tuple[list[Accepted], bool]:
        """Validate every task, record them all in one transaction, hand them to the outbox.

        Args:
            specs: A decoder per task (raising InvalidRequest for a malformed one), so that
                malformed and refused tasks are reported together; each task has its own
                request_id (derived from the batch's) or none.
            caller: Who asks.
            request_id: The batch's request_id, for logs and conflict messages.

        Returns:
            The accepted tasks in order, and whether the batch was a repeat (nothing new).

        Raises:
            PermissionDenied: the caller may not enqueue one of the tasks (the first is named);
                nothing is recorded.
            InvalidTasks: one violation per invalid task, by index; nothing is recorded.
            RequestIdConflict: the batch's request_id was used for other tasks.
            DatabaseUnavailable: nothing was recorded.
        """
        now = dt.datetime.now(dt.UTC)
        news: list[NewTask] = []
        violations: list[tuple[str, str]] = []
        denied: PermissionDenied | None = None
        for index, spec in enumerate(specs):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a large batch must not hold the event loop
            try:
                news.append(self._prepare(spec(), caller, now))
            except PermissionDenied as exc:
                denied = denied or PermissionDenied(f"tasks[{index}]: {exc}")
            except InvalidRequest as exc:
                violations.append((f"tasks[{index}]", str(exc)))
        if denied is not None:
            raise denied
        if violations:
            raise InvalidTasks(violations)
        await self._outbox.room()
        originals = await self._store.insert_batch(news, request_id=request_id)
        if originals is not None:
            log.info("request_id=%s: repeated batch of %d tasks, deduplicated", request_id, len(originals))
            return [Accepted(r.task_id, r.as_of(now).state, deduplicated=True) for r in originals], True
        self._outbox.submit_many([new.delivery for new in news if not new.held])
        if (metrics := telemetry.current) is not None:
            for new in news:
                metrics.task_enqueued(new.task_id, new.delivery.task_name, now)
        return [Accepted(new.task_id, new.state, deduplicated=False) for new in news], False

    def _prepare(self, spec: TaskSpec, caller: Caller, now: dt.datetime) -> NewTask:
        """Check a task and build its row.

        Raises:
            PermissionDenied: the caller may not enqueue this task name.
            InvalidRequest: unknown task, arguments that do not bind, times out of range.
        """
        if not caller.may_enqueue(spec.task_name):
            raise PermissionDenied(f"caller {caller.name!r} may not enqueue {spec.task_name!r}")
        self._catalog.check(spec.task_name, spec.args, spec.kwargs)
        run_time = self._run_time(spec, now)
        if spec.expire_time is not None and spec.expire_time <= max(now, run_time):
            raise InvalidRequest("expire_time must be in the future and after the run time")
        state = TaskState.SCHEDULED if run_time > now else TaskState.QUEUED
        delivery = Delivery(
            task_id=str(uuid.uuid4()),
            task_name=spec.task_name,
            args=spec.args,
            kwargs=spec.kwargs,
            run_time=run_time,
            queue=spec.queue,
            priority=spec.priority,
            expire_time=spec.expire_time,
            headers=spec.headers,
            time_limit=spec.time_limit,
            soft_time_limit=spec.soft_time_limit,
            trace_headers=tracing.trace_headers(),
        )
        held = run_time - now > self._limits.schedule_horizon
        lead = max(self._limits.schedule_horizon, DISPATCH_LEAD)
        return NewTask(
            delivery=delivery,
            state=state,
            caller=caller.name,
            request_id=spec.request_id,
            create_time=now,
            # only a request_id can be retried, so only then is the request's digest needed
            fingerprint=spec.fingerprint() if spec.request_id else "",
            publish_after=run_time - lead if held else now + self._outbox.lease,
            held=held,
        )

    def _run_time(self, spec: TaskSpec, now: dt.datetime) -> dt.datetime:
        if spec.run_time is not None:
            run_time = max(spec.run_time, now)
        elif spec.countdown:
            run_time = now + dt.timedelta(seconds=spec.countdown)
        else:
            return now
        if run_time - now > self._limits.max_schedule:
            days = self._limits.max_schedule.total_seconds() / 86400
            raise InvalidRequest(f"the run time is more than {days:g} days away (the server's maximum)")
        return run_time

    async def get(self, task_id: str, caller: Caller = OPEN) -> TaskRecord:
        """The task as it is now: the database's record, brought up to date from Redis.

        Raises:
            TaskNotFound: no such task was enqueued here, or ``caller`` may not read it.
        """
        record = await self._load(task_id, caller)
        record = await self._refresh(record)
        return record.as_of(dt.datetime.now(dt.UTC))

    async def watch(
        self, task_id: str, caller: Caller = OPEN, *, lifetime: float | None = None
    ) -> AsyncGenerator[TaskRecord, None]:
        """The task's current snapshot, then each change, ending after a terminal state or
        ``lifetime`` seconds (None: no limit).

        While the hub's subscription is up every change reaches the stream through it, so a
        quiet stream neither wakes nor reads anything (except to turn SCHEDULED into QUEUED
        when due). While it is down (the hub sends PAUSED) the stream re-reads the task every
        ``watch_recheck`` seconds; the re-subscribe sends RESYNC, which re-reads it once more.
        The lifetime is one timer per stream that posts EXPIRED to its inbox, not a timeout
        around every wait: a wait then costs no timer of its own.

        Raises:
            TaskNotFound: no such task was enqueued here, or ``caller`` may not read it.
            ShuttingDown: the server is stopping.
            LimitExceeded: the lifetime is over.
        """
        record = await self._load(task_id, caller)
        hub = self._hub
        inbox = hub.register(task_id)
        loop = asyncio.get_running_loop()
        expiry = None if lifetime is None else loop.call_later(lifetime, inbox.put, Signal.EXPIRED)
        try:
            # registered before the snapshot is read: nothing can fall in between
            record = await self._refresh(record)
            last = record.as_of(dt.datetime.now(dt.UTC))
            yield last
            while not last.state.terminal:
                item = await inbox.get(timeout=self._wait_time(last))
                if item is Signal.SHUTDOWN:
                    raise ShuttingDown("the server is shutting down; call StreamProgress again")
                if item is Signal.EXPIRED:
                    raise LimitExceeded(
                        f"stream lifetime limit reached: {lifetime:g} s (TASKGATE_STREAM_LIFETIME); "
                        "call StreamProgress again"
                    )
                if item is Signal.RESYNC or (item is None and not hub.ready):
                    record = await self._reload(record)
                elif item is not None and not isinstance(item, Signal):
                    record = apply_update(record, item)
                # PAUSED, or a SCHEDULED task's due time: as_of() below is all there is to do
                current = record.as_of(dt.datetime.now(dt.UTC))
                if current != last:
                    yield current
                    last = current
        finally:
            if expiry is not None:
                expiry.cancel()
            hub.unregister(task_id, inbox)

    def _wait_time(self, record: TaskRecord) -> float | None:
        """Seconds a stream may wait for news before it must look again (None: no limit)."""
        wait = None if self._hub.ready else self._limits.watch_recheck
        if record.state is TaskState.SCHEDULED:
            due = max((record.run_time - dt.datetime.now(dt.UTC)).total_seconds(), 0.0) + 0.01
            wait = due if wait is None else min(wait, due)
        return wait

    async def _load(self, task_id: str, caller: Caller) -> TaskRecord:
        record = await self._store.get(task_id)
        # another caller's task is answered exactly like an unknown one
        if record is None or not caller.may_read(record.caller):
            raise TaskNotFound(f"no task with id {task_id!r} was enqueued through this gateway")
        return record

    async def _refresh(self, record: TaskRecord) -> TaskRecord:
        """Apply Redis's latest state (and queue it for recording); Redis down is not an error."""
        if record.state.terminal:
            return record
        try:
            update = await self._hub.snapshot(record.task_id)
        except ResultBackendUnavailable as exc:
            log.debug("task_id=%s: Redis unreachable, answering from the database: %r", record.task_id, exc)
            return record
        if update is None:
            return record
        self._recorder.record(update)
        return apply_update(record, update)

    async def _reload(self, record: TaskRecord) -> TaskRecord:
        """Re-read the task: a terminal state in the database wins, else Redis's latest."""
        try:
            fresh = await self._store.get(record.task_id)
        except Unavailable:
            fresh = None
        if fresh is not None and fresh.state.terminal:
            return fresh
        return await self._refresh(record)
