"""The ScheduleService servicer: identify the caller, decode, call the use case, encode."""

from __future__ import annotations

import logging
from typing import Any

from grpc import aio

from service.api import schedule_convert as sc
from service.api.auth import Authenticator
from service.api.limits import InputLimits
from service.api.status import grpc_errors
from service.domain.errors import InvalidRequest
from service.domain.schedule import check_schedule_id
from service.usecases.schedules import Schedules
from taskgate.v1 import schedule_service_pb2 as spb
from taskgate.v1 import schedule_service_pb2_grpc as spb_grpc

Context = aio.ServicerContext[Any, Any]

#: One line per schedule change: who, which schedule, what.
audit = logging.getLogger("taskgate.audit")


class ScheduleServicer(spb_grpc.ScheduleServiceServicer):
    """Implements taskgate.v1.ScheduleService on top of the Schedules use cases."""

    def __init__(
        self,
        schedules: Schedules,
        authenticator: Authenticator | None = None,
        limits: InputLimits | None = None,
    ) -> None:
        self._schedules = schedules
        self._auth = authenticator or Authenticator.open()
        self._limits = limits or InputLimits()

    @grpc_errors
    async def CreateSchedule(  # noqa: N802
        self, request: spb.CreateScheduleRequest, context: Context
    ) -> spb.CreateScheduleResponse:
        caller = self._auth.caller_of(context)
        if not request.HasField("schedule"):
            raise InvalidRequest("schedule is required")
        if request.schedule.WhichOneof("spec") is None:
            raise InvalidRequest("schedule.cron or schedule.interval is required")
        schedule = await self._schedules.create(sc.draft_of(request.schedule, self._limits), caller)
        audit.info("caller=%r create schedule_id=%s", caller.name, schedule.schedule_id)
        return spb.CreateScheduleResponse(schedule=sc.schedule_to_proto(schedule))

    @grpc_errors
    async def GetSchedule(self, request: spb.GetScheduleRequest, context: Context) -> spb.GetScheduleResponse:  # noqa: N802
        caller = self._auth.caller_of(context)
        schedule = await self._schedules.get(check_schedule_id(request.schedule_id), caller)
        return spb.GetScheduleResponse(schedule=sc.schedule_to_proto(schedule))

    @grpc_errors
    async def ListSchedules(  # noqa: N802
        self, request: spb.ListSchedulesRequest, context: Context
    ) -> spb.ListSchedulesResponse:
        caller = self._auth.caller_of(context)
        size = sc.page_size(request.page_size)
        page = await self._schedules.list(sc.decode_page_token(request.page_token), size, caller)
        token = "" if page.next_after is None else sc.encode_page_token(page.next_after)
        return spb.ListSchedulesResponse(
            schedules=[sc.schedule_to_proto(s) for s in page.schedules], next_page_token=token
        )

    @grpc_errors
    async def UpdateSchedule(  # noqa: N802
        self, request: spb.UpdateScheduleRequest, context: Context
    ) -> spb.UpdateScheduleResponse:
        caller = self._auth.caller_of(context)
        if not request.HasField("schedule"):
            raise InvalidRequest("schedule is required")
        fields = sc.mask_of(request)
        draft = sc.draft_of(request.schedule, self._limits, with_task="task" in fields)
        schedule = await self._schedules.update(draft, fields, caller)
        audit.info(
            "caller=%r update schedule_id=%s fields=%s", caller.name, schedule.schedule_id, sorted(fields)
        )
        return spb.UpdateScheduleResponse(schedule=sc.schedule_to_proto(schedule))

    @grpc_errors
    async def DeleteSchedule(  # noqa: N802
        self, request: spb.DeleteScheduleRequest, context: Context
    ) -> spb.DeleteScheduleResponse:
        caller = self._auth.caller_of(context)
        await self._schedules.delete(check_schedule_id(request.schedule_id), caller)
        audit.info("caller=%r delete schedule_id=%s", caller.name, request.schedule_id)
        return spb.DeleteScheduleResponse()

    @grpc_errors
    async def TriggerSchedule(  # noqa: N802
        self, request: spb.TriggerScheduleRequest, context: Context
    ) -> spb.TriggerScheduleResponse:
        caller = self._auth.caller_of(context)
        task_id = await self._schedules.trigger(check_schedule_id(request.schedule_id), caller)
        audit.info("caller=%r trigger schedule_id=%s task_id=%s", caller.name, request.schedule_id, task_id)
        return spb.TriggerScheduleResponse(task_id=task_id)
