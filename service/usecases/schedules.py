"""The schedule use cases: create, read, list, update, delete and trigger schedules, and
the firing round the gateway runs as a background loop. No gRPC, SQL or Redis here.

Every firing is an ordinary task (recorded, then published through the outbox) whose
``schedule_id`` names the schedule. A slot's task has a request_id derived from the
schedule and the slot (``domain.schedule.request_id_of``): any number of replicas firing
the same slot record one task.

Slots are decided up to ``lead`` (``LEAD``, 60 s) ahead, paced evenly over it (``paced_limit``):
the task is recorded then (QUEUED, its ``run_time`` the slot) and held in memory until the
slot, when it goes to the outbox's fast path. So the work at the slot is only the publish,
and the work before it is spread thin enough not to starve Enqueue.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from service.broker.outbox import Outbox
from service.domain.callers import OPEN, Caller
from service.domain.catalog import Catalog
from service.domain.errors import InvalidRequest, PermissionDenied
from service.domain.schedule import (
    DEFAULT_CATCHUP,
    OverlapPolicy,
    Schedule,
    ScheduleNotFound,
    TaskTemplate,
    Timing,
    check_schedule_id,
)
from service.runtime import tracing
from service.store.schedules import ScheduleStore
from service.usecases.control import Control
from service.usecases.schedule_firing import Decider
from service.usecases.schedule_hold import RESERVE, Hold, Pace

log = logging.getLogger(__name__)

#: The fields UpdateSchedule may change (``spec`` stands for whichever of cron and interval).
WRITABLE = frozenset(
    {"cron", "interval", "spec", "time_zone", "task", "paused", "overlap_policy", "catchup_window"}
)
_TIMING = frozenset({"cron", "interval", "spec"})
#: How far ahead of its slot a firing is decided and recorded (then published at the slot).
LEAD = dt.timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Draft:
    """A schedule as a caller wrote it (CreateSchedule, UpdateSchedule), decoded in form only."""

    schedule_id: str
    cron: str = ""
    interval: dt.timedelta | None = None
    time_zone: str = ""
    task: TaskTemplate | None = None
    paused: bool = False
    overlap_policy: OverlapPolicy = OverlapPolicy.SKIP
    catchup_window: dt.timedelta = DEFAULT_CATCHUP


@dataclass(frozen=True, slots=True)
class SchedulePage:
    """One page of schedules and the last id on it when more may follow (else None)."""

    schedules: list[Schedule]
    next_after: str | None


class Schedules:
    """Schedules over the schedule store; fires due slots."""

    def __init__(
        self,
        store: ScheduleStore,
        catalog: Catalog,
        outbox: Outbox,
        *,
        batch: int = 1000,
        poll_interval: float = 0.5,
        lead: dt.timedelta = LEAD,
        control: Control | None = None,
    ) -> None:
        self._store = store
        #: cancels a slot decided ahead when its schedule is paused or deleted before it
        self._control = control
        self._catalog = catalog
        self._outbox = outbox
        self._batch = batch
        self._poll = poll_interval
        self._lead = lead
        self._hold = Hold(outbox.submit_many)
        self._pace = Pace(poll_interval)
        self._decider = Decider(catalog, outbox.lease)

    # --- CRUD ---------------------------------------------------------------------------

    async def create(self, draft: Draft, caller: Caller = OPEN) -> Schedule:
        """Validate and record a schedule; its first slot is computed from now.

        Raises:
            InvalidRequest: a bad id, spec, zone or task template (the message names the field).
            PermissionDenied: the caller may not enqueue the template's task.
            ScheduleExists: the schedule_id is taken.
        """
        check_schedule_id(draft.schedule_id)
        if draft.task is None:
            raise InvalidRequest("schedule.task is required (the task each firing enqueues)")
        now = dt.datetime.now(dt.UTC)
        schedule = Schedule(
            schedule_id=draft.schedule_id,
            timing=Timing(draft.cron, draft.interval, draft.time_zone),
            task=self._checked(draft.task, caller),
            caller=caller.name,
            paused=draft.paused,
            overlap_policy=draft.overlap_policy,
            catchup_window=draft.catchup_window,
            create_time=now,
            update_time=now,
            anchor_time=now,
        ).with_next(now)
        await self._store.create(schedule)
        log.info(
            "schedule_id=%s created by %r, next run %s",
            schedule.schedule_id,
            caller.name,
            schedule.next_run_time,
        )
        return schedule

    async def get(self, schedule_id: str, caller: Caller = OPEN) -> Schedule:
        """The schedule.

        Raises:
            ScheduleNotFound: no such schedule, or one the caller may not see.
        """
        schedule = await self._store.get(check_schedule_id(schedule_id))
        if schedule is None or not caller.may_read(schedule.caller):
            raise _not_found(schedule_id)
        return schedule

    async def list(self, after: str, limit: int, caller: Caller = OPEN) -> SchedulePage:
        """A page of the schedules the caller may see, in schedule_id order."""
        found = await self._store.page(after, limit, None if caller.read_all else caller.name)
        return SchedulePage(found, found[-1].schedule_id if len(found) == limit else None)

    async def update(self, draft: Draft, fields: frozenset[str], caller: Caller = OPEN) -> Schedule:
        """Change the masked ``fields`` of a schedule (AIP-134); the next slot is recomputed
        when the spec, zone or paused state changes.

        Raises:
            InvalidRequest: an unknown field, or a bad new value.
            PermissionDenied: another caller's schedule, or a task the caller may not enqueue.
            ScheduleNotFound: no such schedule, or one the caller may not see.
        """
        unknown = sorted(fields - WRITABLE)
        if unknown:
            raise InvalidRequest(
                f"update_mask names fields that cannot be changed: {', '.join(unknown)}; "
                f"writable: {', '.join(sorted(WRITABLE))}"
            )
        now = dt.datetime.now(dt.UTC)

        def change(current: Schedule) -> Schedule:
            self._may_change(current, caller)
            return self._merged(current, draft, fields, caller, now)

        updated = await self._store.update(check_schedule_id(draft.schedule_id), change)
        if updated is None:
            raise _not_found(draft.schedule_id)
        log.info(
            "schedule_id=%s updated by %r (%s)", updated.schedule_id, caller.name, ", ".join(sorted(fields))
        )
        if updated.paused:
            await self._withdraw(updated, now, "paused")
        return updated

    async def set_paused(self, schedule_id: str, paused: bool, caller: Caller = OPEN) -> Schedule:
        """Pause or resume a schedule (``update`` of the ``paused`` field)."""
        return await self.update(Draft(schedule_id, paused=paused), frozenset({"paused"}), caller)

    async def delete(self, schedule_id: str, caller: Caller = OPEN) -> None:
        """Remove a schedule; the tasks it fired stay.

        Raises:
            PermissionDenied: another caller's schedule.
            ScheduleNotFound: no such schedule, or one the caller may not see.
        """
        self._may_change(await self.get(schedule_id, caller), caller)
        deleted = await self._store.delete(schedule_id)  # as it was then: a slot decided since
        if deleted is None:
            raise _not_found(schedule_id)
        log.info("schedule_id=%s deleted by %r", schedule_id, caller.name)
        await self._withdraw(deleted, dt.datetime.now(dt.UTC), "deleted")

    async def _withdraw(self, schedule: Schedule, now: dt.datetime, why: str) -> None:
        """Cancel the firing decided ahead for a slot still to come (``LEAD``), so a pause or
        a delete takes effect for the next slot: the task ends CANCELLED and, through the
        durable cancel mark, never runs, even if a replica's hold publishes it at the slot."""
        if self._control is None or not schedule.last_task_id:
            return
        if schedule.last_run_time is None or schedule.last_run_time <= now:
            return  # the last firing's slot has come: it is an ordinary task now
        reason = f"schedule {schedule.schedule_id!r} was {why} before this slot"
        await self._control.cancel(schedule.last_task_id, reason=reason)
        log.info("task_id=%s schedule_id=%s: decided slot withdrawn (%s)", schedule.last_task_id,
                 schedule.schedule_id, why)  # fmt: skip

    async def trigger(self, schedule_id: str, caller: Caller = OPEN) -> str:
        """Fire the schedule once now, outside its slots; returns the task id.

        Raises:
            PermissionDenied: another caller's schedule, or a task the caller may not enqueue.
            ScheduleNotFound: no such schedule, or one the caller may not see.
            InvalidRequest: the template no longer fits the catalog.
        """
        schedule = await self.get(schedule_id, caller)
        self._may_change(schedule, caller)
        self._checked(schedule.task, caller)
        now = dt.datetime.now(dt.UTC)
        request_id = f"schedule:{schedule_id}:trigger:{uuid.uuid4().hex}"
        new = self._decider.new_task(schedule, now, now, request_id, tracing.trace_headers())
        await self._outbox.room()
        if not await self._store.record_trigger(schedule_id, new):
            raise _not_found(schedule_id)
        self._outbox.submit(new.delivery)
        log.info("task_id=%s schedule_id=%s triggered by %r", new.task_id, schedule_id, caller.name)
        return new.task_id

    # --- firing -------------------------------------------------------------------------

    async def step(self) -> float:
        """One firing round (the ``schedules`` loop): fire what is due, and a paced share of
        what is due within the lead; hand it to the outbox (now, or at its slot).

        Returns:
            0 when a full batch was claimed (more may be due), else the pause (``Pace``).
        """
        await self._outbox.room()
        now = dt.datetime.now(dt.UTC)
        urgent, ahead, earliest = await self._store.due_counts(now + RESERVE, now + self._lead)
        limit = self._pace.limit(urgent, ahead, earliest, now, self._batch)
        if not limit:
            return self._poll
        claimed, deliveries = await self._store.fire_due(now, limit, self._decider.decide, now + self._lead)
        if deliveries:
            self._hold.hand_over(deliveries)
            log.info("schedules: %d task(s) fired, %d due schedule(s) claimed", len(deliveries), claimed)
        return 0.0 if claimed >= self._batch else self._pace.pause(urgent)

    @property
    def held(self) -> int:
        """Decided-ahead tasks waiting in this process for their slot."""
        return len(self._hold)

    async def release(self) -> None:
        """Stop holding decided-ahead tasks: any replica's outbox relay publishes them at their
        slot (call when stopping; a crash leaves them to the relay a lease after the slot)."""
        held = self._hold.take_all()
        await self._store.release(held)
        if held:
            log.info("schedules: %d decided-ahead task(s) left to the outbox relay", len(held))

    # --- checks -------------------------------------------------------------------------

    def _checked(self, template: TaskTemplate, caller: Caller) -> TaskTemplate:
        """The template, checked as Enqueue checks a task (permission, catalog, signature)."""
        if not caller.may_enqueue(template.task_name):
            raise PermissionDenied(f"caller {caller.name!r} may not enqueue {template.task_name!r}")
        try:
            self._catalog.check(template.task_name, template.args, template.kwargs)
        except InvalidRequest as exc:
            raise type(exc)(f"schedule.task: {exc}") from None
        return template

    @staticmethod
    def _may_change(schedule: Schedule, caller: Caller) -> None:
        if schedule.caller == caller.name:
            return
        if caller.may_read(schedule.caller):
            raise PermissionDenied(
                f"schedule {schedule.schedule_id!r} belongs to caller {schedule.caller!r}; "
                f"caller {caller.name!r} may read it but not change it"
            )
        raise _not_found(schedule.schedule_id)

    def _merged(
        self, current: Schedule, draft: Draft, fields: frozenset[str], caller: Caller, now: dt.datetime
    ) -> Schedule:
        """``current`` with the masked fields of ``draft``."""
        timing = current.timing
        if fields & _TIMING or "time_zone" in fields:
            cron, interval = timing.cron, timing.interval
            if fields & _TIMING:
                cron, interval = draft.cron, draft.interval
            zone = draft.time_zone if "time_zone" in fields else timing.time_zone
            timing = Timing(cron, interval, zone)
        task = current.task
        if "task" in fields:
            if draft.task is None:
                raise InvalidRequest("schedule.task is required when update_mask names it")
            task = draft.task
        new = dataclasses.replace(
            current,
            timing=timing,
            task=self._checked(task, caller),
            paused=draft.paused if "paused" in fields else current.paused,
            overlap_policy=draft.overlap_policy if "overlap_policy" in fields else current.overlap_policy,
            catchup_window=draft.catchup_window if "catchup_window" in fields else current.catchup_window,
            update_time=now,
        )
        if timing != current.timing:
            new = dataclasses.replace(new, anchor_time=now)
        if timing != current.timing or new.paused != current.paused:
            # a slot already decided ahead stands: the next one comes after it
            pending = current.last_run_time
            new = new.with_next(pending if pending is not None and pending > now else now)
        return new


def _not_found(schedule_id: str) -> ScheduleNotFound:
    return ScheduleNotFound(f"no schedule with id {schedule_id!r} (or not one this caller may see)")
