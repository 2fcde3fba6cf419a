"""Schedules: when a schedule fires (cron in a time zone, or a fixed interval), what it
fires (a task template), and what one round of firing decides. No I/O here.

Cron expressions are evaluated by cronsim, which copies Debian cron's daylight-saving
rules. They apply to expressions whose minute and hour fields are both fixed (neither
starts with ``*``), evaluated on the local wall clock:

- a time skipped by spring-forward (02:30 on the night clocks jump from 02:00 to 03:00)
  fires once, at the first minute after the jump (03:00);
- a time repeated by fall-back (01:30 on the night 02:00 goes back to 01:00) fires once,
  at its first occurrence.

Expressions whose minute or hour field starts with ``*`` (``*/15 * * * *``,
``@hourly`` = ``0 * * * *``) step through real time instead: an hourly schedule fires
every real hour, both repeated hours at fall-back included, and none is lost at
spring-forward.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from service.domain.errors import InvalidRequest, RequestIdConflict, TaskNotFound
from service.domain.model import TaskSpec

UTC = dt.UTC
#: schedule_id: letters, digits and ``._-``, 1 to 200 characters.
SCHEDULE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
#: The cron macros and the five fields each stands for.
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: The shortest interval between firings.
MIN_INTERVAL = dt.timedelta(seconds=1)
#: The catch-up window when the caller gives none.
DEFAULT_CATCHUP = dt.timedelta(seconds=60)
#: A slot claimed at most this late is on time, whatever the catch-up window (0 included):
#: a busy gateway is not a downtime.
ON_TIME = dt.timedelta(seconds=10)
#: Most missed slots counted for one gap (a minutely cron down for a year is 525,600).
MAX_COUNTED = 10_000
#: The default of the time fields a schedule gets when stored.
NEVER = dt.datetime.min.replace(tzinfo=UTC)
#: Cron slots remembered per (fields, zone, moment): a firing round of schedules sharing
#: spec and slot computes each next slot once.
SLOT_CACHE = 4096


class ScheduleNotFound(TaskNotFound):
    """No schedule with this id, or not one the caller may see (NOT_FOUND)."""


class ScheduleExists(RequestIdConflict):
    """The schedule_id is taken (ALREADY_EXISTS)."""


class OverlapPolicy(enum.StrEnum):
    """What a slot does while the previous firing has not finished."""

    SKIP = "SKIP"
    ALLOW = "ALLOW"


def check_schedule_id(schedule_id: str, name: str = "schedule_id") -> str:
    """``schedule_id`` if well formed.

    Raises:
        InvalidRequest: empty, too long, or holding other characters than letters, digits, ``._-``.
    """
    if not SCHEDULE_ID_RE.fullmatch(schedule_id):
        raise InvalidRequest(f"{name} must be 1 to 200 letters, digits, '.', '_' or '-'; got {schedule_id!r}")
    return schedule_id


def zone_of(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` ("" = UTC).

    Raises:
        InvalidRequest: no such zone.
    """
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(
            f"time_zone {name!r} is not an IANA time zone name (for example 'Europe/Berlin'; empty means UTC)"
        ) from None


@functools.lru_cache(maxsize=1024)
def cron_fields(expression: str) -> str:
    """The five fields of ``expression`` (macros expanded), checked (remembered: every
    schedule read back from the store checks its spec again).

    Raises:
        InvalidRequest: not five fields, or a field out of range; the message names it.
    """
    text = " ".join(expression.split())
    text = MACROS.get(text.lower(), text)
    if len(text.split()) != 5:
        raise InvalidRequest(
            f"cron {expression!r} must have five fields (minute hour day-of-month month day-of-week) "
            f"or be one of {', '.join(sorted(MACROS))}"
        )
    try:
        CronSim(text, dt.datetime(2000, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError, IndexError) as exc:
        raise InvalidRequest(f"cron {expression!r} is not valid: {exc}") from None
    return text


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule fires: ``cron`` in ``time_zone``, or every ``interval``."""

    cron: str = ""
    interval: dt.timedelta | None = None
    time_zone: str = ""

    def __post_init__(self) -> None:
        if bool(self.cron) == (self.interval is not None):
            raise InvalidRequest("a schedule needs exactly one of cron and interval")
        if self.cron:
            object.__setattr__(self, "cron", cron_fields(self.cron))
        elif self.interval is not None and self.interval < MIN_INTERVAL:
            seconds = self.interval.total_seconds()
            raise InvalidRequest(f"interval must be at least 1 second; got {seconds:g} s")
        zone_of(self.time_zone)

    def next_after(self, moment: dt.datetime, anchor: dt.datetime) -> dt.datetime:
        """The first slot strictly after ``moment`` (UTC). Intervals count from ``anchor``."""
        if self.interval is not None:
            step = _micros(self.interval)
            if moment < anchor:
                return anchor
            count = _micros(moment - anchor) // step + 1
            return anchor + dt.timedelta(microseconds=count * step)
        return cron_next(self.cron, self.time_zone, moment)

    def to_json(self) -> dict[str, Any]:
        """The ``spec`` column."""
        interval = None if self.interval is None else self.interval.total_seconds()
        return {"cron": self.cron, "interval": interval, "time_zone": self.time_zone}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timing:
        """A ``spec`` column back."""
        interval = data.get("interval")
        return cls(
            cron=data.get("cron") or "",
            interval=None if interval is None else dt.timedelta(seconds=interval),
            time_zone=data.get("time_zone") or "",
        )


@functools.lru_cache(maxsize=SLOT_CACHE)
def cron_next(fields: str, zone: str, moment: dt.datetime) -> dt.datetime:
    """The first slot of the cron ``fields`` in ``zone`` strictly after ``moment`` (UTC).

    Pure, so remembered: schedules sharing spec, zone and slot parse the spec once.
    """
    local = moment.astimezone(zone_of(zone))
    for candidate in CronSim(fields, local):
        slot = candidate.astimezone(UTC)
        if slot > moment:  # a start inside a repeated hour can give a slot before it
            return slot
    raise AssertionError("unreachable: cronsim iterates without end")


def _micros(delta: dt.timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass(frozen=True, slots=True)
class TaskTemplate:
    """The task each firing enqueues (everything Enqueue takes but when to run)."""

    task_name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    priority: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: seconds after a firing the task may still start (None: never expires)
    expire_after: float | None = None

    def spec(self, fire_time: dt.datetime, request_id: str = "") -> TaskSpec:
        """The TaskSpec of one firing at ``fire_time``."""
        expire = None if self.expire_after is None else fire_time + dt.timedelta(seconds=self.expire_after)
        return TaskSpec(
            task_name=self.task_name,
            args=list(self.args),
            kwargs=dict(self.kwargs),
            queue=self.queue,
            request_id=request_id,
            priority=self.priority,
            expire_time=expire,
            headers=dict(self.headers),
            time_limit=self.time_limit,
            soft_time_limit=self.soft_time_limit,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``template`` column."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskTemplate:
        """A ``template`` column back."""
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Schedule:
    """One schedule, as stored."""

    schedule_id: str
    timing: Timing
    task: TaskTemplate
    caller: str = ""
    paused: bool = False
    overlap_policy: OverlapPolicy = OverlapPolicy.SKIP
    catchup_window: dt.timedelta = DEFAULT_CATCHUP
    #: output only: the next slot (None while paused)
    next_run_time: dt.datetime | None = None
    last_run_time: dt.datetime | None = None
    last_task_id: str = ""
    #: slots that did not fire: overlap (SKIP), missed beyond the catch-up window
    skipped_count: int = 0
    create_time: dt.datetime = NEVER
    update_time: dt.datetime = NEVER
    #: where interval slots count from (the create time, or the last change of timing)
    anchor_time: dt.datetime = NEVER

    def with_next(self, now: dt.datetime) -> Schedule:
        """This schedule with ``next_run_time`` set from ``now`` (None while paused)."""
        upcoming = None if self.paused else self.timing.next_after(now, self.anchor_time)
        return dataclasses.replace(self, next_run_time=upcoming)


def firing_fingerprint(spec: TaskSpec) -> str:
    """``spec.fingerprint()`` (the same digest) without ``dataclasses.asdict``'s deep copy
    of the arguments: a firing round computes one per fired schedule."""
    body: dict[str, Any] = {name: getattr(spec, name) for name in _SPEC_FIELDS}
    for key in ("time_limit", "soft_time_limit"):
        if body[key] is None:
            del body[key]
    for key in ("run_time", "expire_time"):
        if body[key] is not None:
            body[key] = body[key].isoformat()
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(TaskSpec) if f.name != "request_id")


def request_id_of(schedule: Schedule, slot: dt.datetime) -> str:
    """The request_id of the firing of ``slot``: the same on every replica, so one task per
    slot (the store dedupes on it); the create time tells a re-created schedule's slots apart."""
    created = int(schedule.create_time.timestamp() * 1000)
    return f"schedule:{schedule.schedule_id}:{created}:{int(slot.timestamp() * 1000)}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What one round does with a due schedule."""

    #: the slot to fire now (None: nothing fires)
    fire: dt.datetime | None
    #: slots that do not fire (missed beyond the window, or overlapping)
    skipped: int
    next_run_time: dt.datetime


def plan(schedule: Schedule, now: dt.datetime, *, previous_running: bool) -> Plan:
    """Decide a due schedule's round: the latest slot due fires once, if it is within the
    catch-up window (at least ``ON_TIME``) and, under SKIP, the previous firing has
    finished; every older missed slot is skipped. Never more than one firing per round."""
    timing, anchor = schedule.timing, schedule.anchor_time
    assert schedule.next_run_time is not None
    due = schedule.next_run_time
    window = max(schedule.catchup_window, ON_TIME)
    skipped, start = 0, due
    if now - due > window:
        start = timing.next_after(now - window - dt.timedelta(microseconds=1), anchor)
        skipped = _count(timing, anchor, due, start)
    if start > now:
        return Plan(None, skipped, start)
    latest = start
    while (following := timing.next_after(latest, anchor)) <= now:
        latest, skipped = following, skipped + 1
    upcoming = timing.next_after(latest, anchor)
    if previous_running and schedule.overlap_policy is OverlapPolicy.SKIP:
        return Plan(None, skipped + 1, upcoming)
    return Plan(latest, skipped, upcoming)


def _count(timing: Timing, anchor: dt.datetime, first: dt.datetime, end: dt.datetime) -> int:
    """Slots from ``first`` up to (not including) ``end``, at most ``MAX_COUNTED``."""
    if timing.interval is not None:
        return min(max(-(-_micros(end - first) // _micros(timing.interval)), 0), MAX_COUNTED)
    count, slot = 0, first
    while slot < end and count < MAX_COUNTED:
        count, slot = count + 1, timing.next_after(slot, anchor)
    return count
