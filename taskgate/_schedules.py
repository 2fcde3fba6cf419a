"""ScheduleService for the clients: the ``Schedule`` they return, the request builders, and
the methods ``AsyncClient`` and ``Client`` get from the two mixins here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from grpc import aio

from taskgate import _convert
from taskgate.errors import rpc_errors as _rpc_errors
from taskgate.v1 import schedule_service_pb2 as spb
from taskgate.v1 import schedule_service_pb2_grpc as spb_grpc
from taskgate.v1 import task_service_pb2 as pb

_POLICY = {"SKIP": spb.OVERLAP_POLICY_SKIP, "ALLOW": spb.OVERLAP_POLICY_ALLOW}


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule as the gateway reports it (see ScheduleService's ``Schedule``)."""

    schedule_id: str
    task_name: str
    cron: str = ""
    interval: dt.timedelta | None = None
    time_zone: str = ""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    priority: int | None = None
    paused: bool = False
    #: "SKIP" or "ALLOW"
    overlap_policy: str = "SKIP"
    catchup_window: dt.timedelta = dt.timedelta(seconds=60)
    next_run_time: dt.datetime | None = None
    last_run_time: dt.datetime | None = None
    last_task_id: str = ""
    skipped_count: int = 0
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class SchedulePage:
    """One page of ListSchedules, and the token of the next ("" after the last)."""

    schedules: list[Schedule]
    next_page_token: str


def _time(message: spb.Schedule, name: str) -> dt.datetime | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    stamp: Any = getattr(message, name)
    moment: dt.datetime = stamp.ToDatetime(tzinfo=dt.UTC)
    return moment


def schedule_from_proto(message: spb.Schedule) -> Schedule:
    """The proto Schedule as a ``Schedule``."""
    task = message.task
    return Schedule(
        schedule_id=message.schedule_id,
        task_name=task.task_name,
        cron=message.cron,
        interval=message.interval.ToTimedelta() if message.WhichOneof("spec") == "interval" else None,
        time_zone=message.time_zone,
        args=[_convert.from_value(v) for v in task.args.values],
        kwargs=_convert.from_struct(task.kwargs),
        queue=task.queue,
        priority=task.priority if task.HasField("priority") else None,
        paused=message.paused,
        overlap_policy="ALLOW" if message.overlap_policy == spb.OVERLAP_POLICY_ALLOW else "SKIP",
        catchup_window=message.catchup_window.ToTimedelta(),
        next_run_time=_time(message, "next_run_time"),
        last_run_time=_time(message, "last_run_time"),
        last_task_id=message.last_task_id,
        skipped_count=message.skipped_count,
        create_time=_time(message, "create_time"),
        update_time=_time(message, "update_time"),
    )


def schedule_message(schedule_id: str, **fields: Any) -> tuple[spb.Schedule, list[str]]:
    """A Schedule message with the given fields set, and their mask paths.

    Fields: cron, interval (seconds or timedelta), time_zone, task_name with args, kwargs,
    queue, priority, expire_after (the ``task`` path), paused, overlap_policy ("SKIP" or
    "ALLOW"), catchup_window (seconds or timedelta). None means not given.
    """
    message, paths = spb.Schedule(schedule_id=schedule_id), list[str]()
    given = {name: value for name, value in fields.items() if value is not None}
    if "cron" in given:
        message.cron, paths = given["cron"], [*paths, "cron"]
    if "interval" in given:
        message.interval.CopyFrom(_convert.to_duration(given["interval"]))
        paths.append("interval")
    for name in ("time_zone", "paused"):
        if name in given:
            setattr(message, name, given[name])
            paths.append(name)
    if "overlap_policy" in given:
        message.overlap_policy = _POLICY[given["overlap_policy"].upper()]
        paths.append("overlap_policy")
    if "catchup_window" in given:
        message.catchup_window.CopyFrom(_convert.to_duration(given["catchup_window"]))
        paths.append("catchup_window")
    if "task_name" in given:
        message.task.CopyFrom(_template(given))
        paths.append("task")
    return message, paths


def _template(given: Mapping[str, Any]) -> pb.TaskTemplate:
    template = pb.TaskTemplate(
        task_name=given["task_name"],
        args=_convert.to_list_value(given.get("args", ())),
        kwargs=_convert.to_struct(given.get("kwargs", {})),
        queue=given.get("queue", ""),
        priority=given.get("priority"),
    )
    if "expire_after" in given:
        template.expire_after.CopyFrom(_convert.to_duration(given["expire_after"]))
    return template


class AsyncSchedules:
    """ScheduleService on ``AsyncClient``."""

    _channel: aio.Channel
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    @property
    def _schedules(self) -> spb_grpc.ScheduleServiceAsyncStub:
        return spb_grpc.ScheduleServiceStub(self._channel)

    async def create_schedule(self, schedule_id: str, task_name: str, **fields: Any) -> Schedule:
        """Create a schedule: ``cron=`` or ``interval=`` (seconds), and optionally time_zone,
        args, kwargs, queue, priority, expire_after, paused, overlap_policy, catchup_window."""
        message, _ = schedule_message(schedule_id, task_name=task_name, **fields)
        with _rpc_errors():
            response = await self._schedules.CreateSchedule(
                spb.CreateScheduleRequest(schedule=message), timeout=self._timeout, metadata=self._metadata
            )
        return schedule_from_proto(response.schedule)

    async def get_schedule(self, schedule_id: str) -> Schedule:
        """The schedule; NotFound for an unknown one or another caller's."""
        request = spb.GetScheduleRequest(schedule_id=schedule_id)
        with _rpc_errors():
            response = await self._schedules.GetSchedule(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return schedule_from_proto(response.schedule)

    async def list_schedules(self, *, page_size: int = 0, page_token: str = "") -> SchedulePage:
        """One page of the schedules the caller may see, in schedule_id order."""
        request = spb.ListSchedulesRequest(page_size=page_size, page_token=page_token)
        with _rpc_errors():
            response = await self._schedules.ListSchedules(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return SchedulePage([schedule_from_proto(s) for s in response.schedules], response.next_page_token)

    async def update_schedule(self, schedule_id: str, **fields: Any) -> Schedule:
        """Change only the fields given (as ``create_schedule``'s; task_name replaces the task)."""
        message, paths = schedule_message(schedule_id, **fields)
        if not paths:
            return await self.get_schedule(schedule_id)
        request = spb.UpdateScheduleRequest(
            schedule=message, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        with _rpc_errors():
            response = await self._schedules.UpdateSchedule(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return schedule_from_proto(response.schedule)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete the schedule (the tasks it fired stay)."""
        request = spb.DeleteScheduleRequest(schedule_id=schedule_id)
        with _rpc_errors():
            await self._schedules.DeleteSchedule(request, timeout=self._timeout, metadata=self._metadata)

    async def trigger_schedule(self, schedule_id: str) -> str:
        """Fire the schedule once now; returns the task id."""
        request = spb.TriggerScheduleRequest(schedule_id=schedule_id)
        with _rpc_errors():
            response = await self._schedules.TriggerSchedule(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.task_id


class Schedules:
    """ScheduleService on ``Client`` (blocking)."""

    _channel: grpc.Channel
    _metadata: tuple[tuple[str, str], ...]
    _timeout: float | None

    @property
    def _schedules(self) -> spb_grpc.ScheduleServiceStub:
        return spb_grpc.ScheduleServiceStub(self._channel)

    def create_schedule(self, schedule_id: str, task_name: str, **fields: Any) -> Schedule:
        """As ``AsyncClient.create_schedule``."""
        message, _ = schedule_message(schedule_id, task_name=task_name, **fields)
        with _rpc_errors():
            response = self._schedules.CreateSchedule(
                spb.CreateScheduleRequest(schedule=message), timeout=self._timeout, metadata=self._metadata
            )
        return schedule_from_proto(response.schedule)

    def get_schedule(self, schedule_id: str) -> Schedule:
        """As ``AsyncClient.get_schedule``."""
        request = spb.GetScheduleRequest(schedule_id=schedule_id)
        with _rpc_errors():
            response = self._schedules.GetSchedule(request, timeout=self._timeout, metadata=self._metadata)
        return schedule_from_proto(response.schedule)

    def list_schedules(self, *, page_size: int = 0, page_token: str = "") -> SchedulePage:
        """As ``AsyncClient.list_schedules``."""
        request = spb.ListSchedulesRequest(page_size=page_size, page_token=page_token)
        with _rpc_errors():
            response = self._schedules.ListSchedules(request, timeout=self._timeout, metadata=self._metadata)
        return SchedulePage([schedule_from_proto(s) for s in response.schedules], response.next_page_token)

    def update_schedule(self, schedule_id: str, **fields: Any) -> Schedule:
        """As ``AsyncClient.update_schedule``."""
        message, paths = schedule_message(schedule_id, **fields)
        if not paths:
            return self.get_schedule(schedule_id)
        request = spb.UpdateScheduleRequest(
            schedule=message, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        with _rpc_errors():
            response = self._schedules.UpdateSchedule(request, timeout=self._timeout, metadata=self._metadata)
        return schedule_from_proto(response.schedule)

    def delete_schedule(self, schedule_id: str) -> None:
        """As ``AsyncClient.delete_schedule``."""
        request = spb.DeleteScheduleRequest(schedule_id=schedule_id)
        with _rpc_errors():
            self._schedules.DeleteSchedule(request, timeout=self._timeout, metadata=self._metadata)

    def trigger_schedule(self, schedule_id: str) -> str:
        """As ``AsyncClient.trigger_schedule``."""
        request = spb.TriggerScheduleRequest(schedule_id=schedule_id)
        with _rpc_errors():
            response = self._schedules.TriggerSchedule(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.task_id


__all__ = ["AsyncSchedules", "Schedule", "SchedulePage", "Schedules", "schedule_message"]
