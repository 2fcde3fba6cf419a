"""The workflow use cases: enqueue a chain/group/chord, read it, watch it, cancel it, and
the loop that accounts for every step. No gRPC, SQL or Redis here.

Enqueue checks every step (catalog, signatures with the previous result prepended,
permissions, limits) and names the first bad one by path; it fixes every task id, has
Celery's canvas build the entry messages (``CanvasPort``), makes the result-backend writes
a chord needs, and records the workflow and every step in one transaction. The outbox
publishes the entry steps; the workers send the rest, as Celery's canvas does.

Celery sends a step only when everything before it succeeded: a step waiting on a failed
or cancelled one would read WAITING for ever. ``step()`` (a supervised loop) ends such
steps CANCELLED, naming the step that stopped them, and records the workflow's terminal
state once no step can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.broker.outbox import Outbox
from service.domain.callers import OPEN, Caller
from service.domain.catalog import Catalog
from service.domain.errors import (
    InvalidRequest,
    InvalidTasks,
    PermissionDenied,
    TaskNotFound,
)
from service.domain.model import Delivery, TaskError, TaskRecord, TaskState
from service.domain.workflow import (
    MAX_DEPTH,
    BackendWrite,
    Step,
    TaskStep,
    WorkflowRecord,
    blocked,
    depth_of,
    entries,
    fingerprint,
    overall_state,
    receivers,
    tasks_of,
    with_ids,
)
from service.runtime import tracing
from service.store.rows import NewTask
from service.store.workflows import WorkflowStore
from service.usecases.control import Control
from service.usecases.workflow_watch import SubscriptionPort, Wakeups, follow

log = logging.getLogger(__name__)

#: Seconds between two passes of the workflow loop.
LOOP_INTERVAL = 0.5
#: Seconds between two passes of the loop over every unfinished workflow; the passes in
#: between look only at workflows with a step changed since the previous pass.
SWEEP_INTERVAL = 30.0
#: Seconds a pass looks back past the previous one (steps' times come from other clocks too).
LOOK_BACK = 10.0
#: Unfinished workflows looked at per pass.
LOOP_BATCH = 200
_RECEIVES_HINT = " (the previous step's result comes first; immutable: true refuses it)"


class WorkflowNotFound(TaskNotFound):
    """No workflow with this id was enqueued here (or the caller may not read it)."""


class CapturePort(Protocol):
    """What Celery's canvas sends for a workflow (``service.broker.canvas.CanvasCapture``)."""

    def build(self, root: Step, now: dt.datetime, trace: Mapping[str, str] | None = None) -> _Captured | None:
        """What ``capture`` gives, built by hand for the plain shapes (fast); None for others."""
        ...

    def capture(self, root: Step, now: dt.datetime, trace: Mapping[str, str] | None = None) -> _Captured:
        """The entry deliveries (with Celery's messages) and the result-backend writes
        (runs Celery's canvas: blocking, call it off the loop)."""
        ...


class _Captured(Protocol):
    deliveries: list[Delivery]
    writes: list[BackendWrite]


class WriterPort(Protocol):
    """Makes result-backend writes (``service.results.chords.BackendWriter``)."""

    async def write(self, writes: Sequence[BackendWrite]) -> None:
        """Make the writes, in order."""
        ...


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The answer to EnqueueWorkflow."""

    workflow_id: str
    task_ids: list[str]
    deduplicated: bool


@dataclass(frozen=True, slots=True)
class WorkflowView:
    """A workflow as a caller sees it: its state and every step's task, depth first."""

    workflow_id: str
    state: TaskState
    tasks: list[TaskRecord]
    create_time: dt.datetime
    end_time: dt.datetime | None


class Workflows:
    """Enqueues, reads, watches and cancels workflows; advances them (``step``)."""

    def __init__(
        self,
        store: WorkflowStore,
        catalog: Catalog,
        outbox: Outbox,
        canvas: CapturePort,
        writer: WriterPort,
        control: Control | None,
        *,
        max_tasks: int = 1000,
        hub: SubscriptionPort | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._outbox = outbox
        self._canvas = canvas
        self._writer = writer
        self._control = control
        self._max_tasks = max_tasks
        #: the shared subscription the streams wait on (None: they poll the version query)
        self._hub = hub
        self._wakeups = Wakeups()
        self._last_pass: dt.datetime | None = None
        self._next_sweep = 0.0

    # --- enqueue ---------------------------------------------------------------------

    async def enqueue(self, root: Step, caller: Caller = OPEN, *, request_id: str = "") -> Enqueued:
        """Validate, record every step in one transaction, hand the entry steps to the outbox.

        Raises:
            InvalidRequest: a step is invalid (``InvalidTasks``: one violation per step, by
                path) or a limit is exceeded; nothing is recorded.
            PermissionDenied: the caller may not enqueue a step's task (the first is named).
            RequestIdConflict: request_id reused for another workflow.
            DatabaseUnavailable, ResultBackendUnavailable: nothing was recorded (retry).
        """
        self._check(root, caller)
        now = dt.datetime.now(dt.UTC)
        root = with_ids(root)
        trace = tracing.trace_headers()
        captured = self._canvas.build(root, now, trace)
        if captured is None:
            captured = await asyncio.to_thread(self._canvas.capture, root, now, trace)
        entry_ids = {task.task_id for task in entries(root)}
        sent = {delivery.task_id for delivery in captured.deliveries}
        if sent != entry_ids:  # pragma: no cover - Celery's canvas and ours disagree
            raise RuntimeError(f"canvas sends {sorted(sent)}, expected the entry steps {sorted(entry_ids)}")
        record = WorkflowRecord(
            workflow_id=str(uuid.uuid4()),
            caller=caller.name,
            request_id=request_id,
            fingerprint=fingerprint(root) if request_id else "",  # compared only on a repeat
            root=root,
            state=TaskState.QUEUED,
            create_time=now,
        )
        news = self._rows(record, captured.deliveries, now)
        await self._outbox.room()
        await self._writer.write(captured.writes)  # before any entry step can be published
        original = await self._store.insert(record, news)
        if original is not None:
            log.info("workflow_id=%s request_id=%s deduplicated", original.workflow_id, request_id)
            return Enqueued(original.workflow_id, original.task_ids, deduplicated=True)
        self._outbox.submit_many(captured.deliveries)
        log.info("workflow_id=%s request_id=%s accepted: %d steps", record.workflow_id, request_id, len(news))
        return Enqueued(record.workflow_id, record.task_ids, deduplicated=False)

    def _check(self, root: Step, caller: Caller) -> None:
        tasks = list(tasks_of(root))
        if not tasks:
            raise InvalidRequest("root: the workflow has no task")
        if len(tasks) > self._max_tasks:
            raise InvalidRequest(
                f"the workflow has {len(tasks)} tasks; the limit is {self._max_tasks} (TASKGATE_MAX_BATCH)"
            )
        if depth_of(root) > MAX_DEPTH:
            raise InvalidRequest(f"the workflow nests chains and groups deeper than {MAX_DEPTH} levels")
        given = receivers(root)
        violations: list[tuple[str, str]] = []
        for task in tasks:
            if not caller.may_enqueue(task.task_name):
                raise PermissionDenied(
                    f"{task.path}: caller {caller.name!r} may not enqueue {task.task_name!r}"
                )
            receives = task.path in given and not task.immutable
            try:
                self._catalog.check(
                    task.task_name, [None, *task.args] if receives else task.args, task.kwargs
                )
            except InvalidRequest as exc:
                violations.append((task.path, f"{exc}{_RECEIVES_HINT if receives else ''}"))
        if violations:
            raise InvalidTasks(violations)

    def _rows(self, record: WorkflowRecord, deliveries: list[Delivery], now: dt.datetime) -> list[NewTask]:
        sent = {delivery.task_id: delivery for delivery in deliveries}
        news = []
        for task in tasks_of(record.root):
            delivery = sent.get(task.task_id) or _waiting_delivery(task, now)
            entry = task.task_id in sent
            news.append(
                NewTask(
                    delivery=delivery,
                    state=TaskState.QUEUED if entry else TaskState.WAITING,
                    caller=record.caller,
                    request_id="",
                    create_time=now,
                    fingerprint="",
                    publish_after=now + self._outbox.lease if entry else None,
                    held=False,
                    workflow_id=record.workflow_id,
                )
            )
        return news

    # --- read, watch ------------------------------------------------------------------

    async def get(self, workflow_id: str, caller: Caller = OPEN) -> WorkflowView:
        """The workflow as it is now.

        Raises:
            WorkflowNotFound: no such workflow, or ``caller`` may not read it.
        """
        return await self._view(await self._load(workflow_id, caller))

    async def watch(
        self, workflow_id: str, caller: Caller = OPEN, *, lifetime: float | None = None
    ) -> AsyncGenerator[WorkflowView, None]:
        """The workflow's snapshot, then one per change, ending after a terminal state or
        ``lifetime`` seconds (``workflow_watch.follow``: an update of a step, coming through
        the shared subscription, re-reads the workflow from the database).

        Raises:
            WorkflowNotFound: no such workflow, or ``caller`` may not read it.
            ShuttingDown: the server is stopping.
            LimitExceeded: the lifetime is over.
        """
        record = await self._load(workflow_id, caller)

        async def read() -> WorkflowView:
            nonlocal record
            if not record.state.terminal:
                record = await self._load(workflow_id, caller)
            return await self._view(record)

        views = follow(
            self._hub,
            self._wakeups,
            workflow_id,
            record.task_ids,
            read,
            lambda: self._store.version(workflow_id),
            lifetime,
        )
        async with contextlib.aclosing(views):
            async for view in views:
                yield view

    async def _load(self, workflow_id: str, caller: Caller) -> WorkflowRecord:
        record = await self._store.get(workflow_id)
        if record is None or not caller.may_read(record.caller):
            raise WorkflowNotFound(f"no workflow with id {workflow_id!r} was enqueued through this gateway")
        return record

    async def _view(self, record: WorkflowRecord) -> WorkflowView:
        """The workflow with its steps; an unfinished one is settled first (``_advance``),
        so no reader sees a step Celery marked FAILED for an earlier one's failure."""
        if record.state.terminal:
            steps = await self._store.steps(record.workflow_id)
            state, end_time = record.state, record.end_time
        else:
            steps, state = await self._advance(record)
            end_time = None
        now = dt.datetime.now(dt.UTC)
        tasks = [steps[task_id].as_of(now) for task_id in record.task_ids if task_id in steps]
        if state.terminal and end_time is None:
            end_time = max((task.end_time for task in tasks if task.end_time), default=now)
        return WorkflowView(record.workflow_id, state, tasks, record.create_time, end_time)

    # --- cancel ---------------------------------------------------------------------------

    async def cancel(
        self, workflow_id: str, caller: Caller = OPEN, *, terminate: bool = False, reason: str = ""
    ) -> WorkflowView:
        """Cancel every unfinished step as CancelTask does (the last steps first, so none is
        sent once its predecessor is cancelled); returns the workflow after it.

        Raises:
            WorkflowNotFound: no such workflow, or ``caller`` may not read it.
            PermissionDenied: ``caller`` may not enqueue one of its tasks.
            ResultBackendUnavailable, DatabaseUnavailable: retry (cancel is idempotent).
        """
        record = await self._load(workflow_id, caller)
        if record.state.terminal:
            return await self._view(record)
        if self._control is None:  # pragma: no cover - wired by service/app.py
            raise RuntimeError("CancelWorkflow needs the control use cases")
        steps = await self._store.steps(workflow_id)
        for task_id in reversed(record.task_ids):
            step = steps.get(task_id)
            if step is not None and not step.state.terminal:
                await self._control.cancel(task_id, caller, terminate=terminate, reason=reason)
        log.info("workflow_id=%s cancel requested (terminate=%s)", workflow_id, terminate)
        await self._advance(record)
        self._wakeups.wake(workflow_id)
        return await self._view(await self._load(workflow_id, caller))

    # --- the loop -------------------------------------------------------------------------

    async def step(self) -> float:
        """One pass over the unfinished workflows that have something to do (a step that
        stops others, a cancel, nothing left to run): those with a step changed since the
        previous pass, or every one each ``SWEEP_INTERVAL`` seconds. Returns the seconds
        until the next pass."""
        started, clock = dt.datetime.now(dt.UTC), time.monotonic()
        since = None
        if self._last_pass is not None and clock < self._next_sweep:
            since = self._last_pass - dt.timedelta(seconds=LOOK_BACK)
        for record in await self._store.needing_attention(LOOP_BATCH, since):
            await self._advance(record)
        self._last_pass = started
        if since is None:
            self._next_sweep = clock + SWEEP_INTERVAL
        return LOOP_INTERVAL

    async def _advance(self, record: WorkflowRecord) -> tuple[dict[str, TaskRecord], TaskState]:
        """End the steps that can no longer run, and the workflow once nothing can run;
        returns the steps after it and the workflow's state."""
        steps = await self._store.steps(record.workflow_id)
        now = dt.datetime.now(dt.UTC)
        errors = _stop_errors(record.root, steps)
        if errors and await self._store.cancel_stopped(errors, now):
            for task_id, error in errors.items():
                log.info("workflow_id=%s task_id=%s %s", record.workflow_id, task_id, error.message)
            steps = await self._store.steps(record.workflow_id)
            self._wakeups.wake(record.workflow_id)
        state = overall_state(list(steps.values()))
        if state.terminal:
            await self._store.finish(record.workflow_id, state, now)
            log.info("workflow_id=%s ended %s", record.workflow_id, state.value)
            self._wakeups.wake(record.workflow_id)
        return steps, state


def _stop_errors(root: Step, steps: dict[str, TaskRecord]) -> dict[str, TaskError]:
    """The error of every WAITING step that can no longer run (or whose cancel was asked)."""
    paths = {task.task_id: task.path for task in tasks_of(root)}
    errors = {}
    for task_id, stopper in blocked(root, steps).items():
        message = f"not run: step {paths[stopper]} (task {stopper}) ended {steps[stopper].state.value}"
        errors[task_id] = TaskError(type="WorkflowStepNotRun", message=message)
    for task_id, record in steps.items():
        if record.state is TaskState.WAITING and record.cancel_requested and task_id not in errors:
            errors[task_id] = TaskError(type="TaskRevokedError", message="cancelled before it was sent")
    return errors


def _waiting_delivery(task: TaskStep, now: dt.datetime) -> Delivery:
    """The row of a step the workers send (never published by the gateway)."""
    return Delivery(
        task_id=task.task_id,
        task_name=task.task_name,
        args=task.args,
        kwargs=task.kwargs,
        run_time=now,
        queue=task.queue,
        priority=task.priority,
        headers=task.headers,
        time_limit=task.time_limit,
        soft_time_limit=task.soft_time_limit,
    )
