"""What one due schedule's firing decides, and the task it records (``service.usecases.schedules``).

A firing round decides up to a batch of schedules at once, so the per-firing work here is
kept to what differs between firings: the slot, the request_id, the task id and the trace.
What only depends on the template (its request digest, unless ``expire_after`` makes the
task depend on the slot) is computed once per template object; task ids are drawn from
random bytes read in bulk; the delivery shares the template's argument containers, which
nothing mutates (templates are frozen, and shared between schedules by the store already).
"""

from __future__ import annotations

import datetime as dt
import logging
import os

from service.domain.catalog import Catalog
from service.domain.errors import InvalidRequest
from service.domain.model import Delivery, TaskState
from service.domain.schedule import Plan, Schedule, TaskTemplate, firing_fingerprint, plan, request_id_of
from service.runtime.schedule_tracing import firing_headers
from service.store.rows import NewTask
from service.store.schedules import Firing

log = logging.getLogger("service.usecases.schedules")

#: Templates whose firing digest is remembered (see ``Decider.fingerprint``).
DIGESTS = 32_768
#: Task ids drawn per read of random bytes.
ID_BATCH = 512


class TaskIds:
    """Random (version 4) UUID strings, as ``str(uuid.uuid4())``, from bytes read in bulk."""

    def __init__(self) -> None:
        self._ids: list[str] = []

    def __call__(self) -> str:
        if not self._ids:
            self._ids = _uuid4s(ID_BATCH)
        return self._ids.pop()


def _uuid4s(count: int) -> list[str]:
    raw = bytearray(os.urandom(16 * count))
    ids = []
    for start in range(0, len(raw), 16):
        raw[start + 6] = (raw[start + 6] & 0x0F) | 0x40  # version 4
        raw[start + 8] = (raw[start + 8] & 0x3F) | 0x80  # RFC 4122 variant
        h = raw[start : start + 16].hex()
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


class Decider:
    """Decides due schedules' rounds and builds their tasks."""

    def __init__(self, catalog: Catalog, lease: dt.timedelta) -> None:
        self._catalog = catalog
        #: the outbox's publish lease: a held task is the relay's a lease after its slot
        self._lease = lease
        self._ids = TaskIds()
        #: id(template) → (template, digest): one template object per distinct template (store)
        self._digests: dict[int, tuple[TaskTemplate, str]] = {}

    def decide(self, schedule: Schedule, previous_running: bool, now: dt.datetime) -> Firing:
        """The plan of a due schedule's round, and its task when a slot fires."""
        assert schedule.next_run_time is not None
        at = max(now, schedule.next_run_time)  # a slot decided ahead is decided as at the slot
        decided = plan(schedule, at, previous_running=previous_running)
        if decided.fire is None:
            if decided.skipped:
                log.info("schedule_id=%s: %d slot(s) skipped", schedule.schedule_id, decided.skipped)
            return Firing(decided, None)
        template = schedule.task
        try:
            self._catalog.check(template.task_name, template.args, template.kwargs)
        except InvalidRequest as exc:
            log.warning("schedule_id=%s: slot %s skipped: %s", schedule.schedule_id, decided.fire, exc)
            return Firing(Plan(None, decided.skipped + 1, decided.next_run_time), None)
        task_id = self._ids()
        trace = firing_headers(schedule.schedule_id, decided.fire, task_id)
        new = self.new_task(schedule, now, at, request_id_of(schedule, decided.fire), trace, task_id)
        return Firing(decided, new)

    def new_task(self, schedule: Schedule, now: dt.datetime, run_time: dt.datetime, request_id: str,
                 trace: dict[str, str] | None, task_id: str = "") -> NewTask:  # fmt: skip
        """The task of one firing at ``run_time``, recorded ``now``."""
        template = schedule.task
        expire = None
        if template.expire_after is not None:
            expire = run_time + dt.timedelta(seconds=template.expire_after)
        delivery = Delivery(
            task_id=task_id or self._ids(),
            task_name=template.task_name,
            args=template.args,
            kwargs=template.kwargs,
            run_time=run_time,
            queue=template.queue,
            priority=template.priority,
            expire_time=expire,
            headers=template.headers,
            time_limit=template.time_limit,
            soft_time_limit=template.soft_time_limit,
            trace_headers=trace,
        )
        return NewTask(
            delivery=delivery,
            state=TaskState.QUEUED,
            caller=schedule.caller,
            request_id=request_id,
            create_time=now,
            fingerprint=self.fingerprint(template, run_time),
            publish_after=run_time + self._lease,
            held=False,
            schedule_id=schedule.schedule_id,
        )

    def fingerprint(self, template: TaskTemplate, fire_time: dt.datetime) -> str:
        """The firing's request digest (``TaskSpec.fingerprint`` of ``template.spec``);
        remembered per template object when it does not depend on the firing time (no
        ``expire_after``)."""
        if template.expire_after is not None:
            return firing_fingerprint(template.spec(fire_time))
        known = self._digests.get(id(template))
        if known is not None and known[0] is template:  # the entry holds it: the id is not reused
            return known[1]
        if len(self._digests) >= DIGESTS:
            self._digests.clear()
        digest = firing_fingerprint(template.spec(fire_time))
        self._digests[id(template)] = (template, digest)
        return digest
