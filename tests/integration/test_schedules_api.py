"""ScheduleService against the real stack: CRUD and trigger (also through reflection alone,
as grpcurl or buf curl would call it), validation and permission errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from service.api.auth import Authenticator, Security
from service.api.server import build_server
from service.app import Runtime
from service.domain.callers import Callers
from taskgate.v1 import schedule_service_pb2 as spb
from taskgate.v1 import schedule_service_pb2_grpc as spb_grpc
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, wait_state
from tests.integration.test_reflection import buf_path
from tests.security import bearer, refused, write_auth_file


def sid() -> str:
    return f"api-{uuid.uuid4().hex[:10]}"


def cron_schedule(schedule_id: str, cron: str = "0 3 * * *", zone: str = "Europe/Berlin") -> spb.Schedule:
    return spb.Schedule(
        schedule_id=schedule_id,
        cron=cron,
        time_zone=zone,
        task=pb.TaskTemplate(task_name="demo.add", args=args(1, 2)),
    )


@pytest.fixture(scope="module")
async def schedule_port(runtime: Runtime) -> AsyncIterator[int]:
    server, port = build_server(runtime.gateway, runtime.health, "127.0.0.1:0", schedules=runtime.schedules)
    await server.start()
    yield port
    await server.stop(0)


@pytest.fixture(scope="module")
async def channel_s(schedule_port: int) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{schedule_port}") as channel:
        yield channel


@pytest.fixture
def schedules(channel_s: aio.Channel) -> spb_grpc.ScheduleServiceStub:
    return spb_grpc.ScheduleServiceStub(channel_s)


@pytest.fixture
def tasks(channel_s: aio.Channel) -> pb_grpc.TaskServiceStub:
    return pb_grpc.TaskServiceStub(channel_s)


async def test_create_get_list_update_delete(schedules: spb_grpc.ScheduleServiceStub) -> None:
    schedule_id = sid()
    created = (
        await schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=cron_schedule(schedule_id)))
    ).schedule
    assert created.cron == "0 3 * * *" and created.time_zone == "Europe/Berlin"
    next_local = created.next_run_time.ToDatetime().hour
    assert next_local in (1, 2)  # 03:00 Berlin is 01:00 or 02:00 UTC
    assert created.catchup_window.seconds == 60
    assert created.overlap_policy == spb.OVERLAP_POLICY_SKIP
    got = (await schedules.GetSchedule(spb.GetScheduleRequest(schedule_id=schedule_id))).schedule
    assert got == created

    listed: list[str] = []
    token = ""
    while True:
        page = await schedules.ListSchedules(spb.ListSchedulesRequest(page_size=2, page_token=token))
        listed += [s.schedule_id for s in page.schedules]
        token = page.next_page_token
        if not token:
            break
    assert schedule_id in listed and listed == sorted(listed)

    change = spb.Schedule(schedule_id=schedule_id, interval={"seconds": 3600}, paused=True)
    request = spb.UpdateScheduleRequest(schedule=change, update_mask={"paths": ["interval"]})
    updated = (await schedules.UpdateSchedule(request)).schedule
    assert updated.WhichOneof("spec") == "interval" and updated.interval.seconds == 3600
    assert not updated.paused  # not in the mask: unchanged
    assert updated.next_run_time != created.next_run_time
    assert updated.task == created.task

    request = spb.UpdateScheduleRequest(schedule=change, update_mask={"paths": ["paused"]})
    paused = (await schedules.UpdateSchedule(request)).schedule
    assert paused.paused and not paused.HasField("next_run_time")

    await schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))
    error = await refused(schedules.GetSchedule(spb.GetScheduleRequest(schedule_id=schedule_id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_trigger_fires_a_task_now(
    schedules: spb_grpc.ScheduleServiceStub, tasks: pb_grpc.TaskServiceStub
) -> None:
    schedule_id = sid()
    paused = cron_schedule(schedule_id)
    paused.paused = True
    await schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=paused))
    task_id = (await schedules.TriggerSchedule(spb.TriggerScheduleRequest(schedule_id=schedule_id))).task_id
    task = await wait_state(tasks, task_id)
    assert task.state == pb.TASK_STATE_SUCCEEDED and task.schedule_id == schedule_id
    listed = await tasks.ListTasks(pb.ListTasksRequest(filter=f'schedule_id = "{schedule_id}"'))
    assert [t.task_id for t in listed.tasks] == [task_id]
    got = (await schedules.GetSchedule(spb.GetScheduleRequest(schedule_id=schedule_id))).schedule
    assert got.last_task_id == task_id
    await schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))
    assert (await tasks.GetStatus(pb.GetStatusRequest(task_id=task_id))).task.schedule_id == schedule_id


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *"}, "five fields"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"cron": "", "interval": {"nanos": 500_000_000}}, "interval must be at least 1 second"),
        ({"schedule_id": "has space"}, "schedule_id"),
        ({"task": pb.TaskTemplate(task_name="demo.nope")}, "schedule.task: task_name 'demo.nope'"),
        ({"task": pb.TaskTemplate(task_name="demo.add", args=args(1, 2, 3))}, "schedule.task"),
        ({"task": pb.TaskTemplate(task_name="demo.add", priority=12)}, "schedule.task.priority"),
    ],
)
async def test_validation_errors_name_the_field(
    schedules: spb_grpc.ScheduleServiceStub, change: dict[str, Any], field: str
) -> None:
    message = cron_schedule(sid())
    for name, value in change.items():
        if name == "interval":
            message.interval.nanos = value["nanos"]
        elif name == "task":
            message.task.CopyFrom(value)
        else:
            setattr(message, name, value)
    error = await refused(schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=message)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")


async def test_taken_id_and_bad_mask(schedules: spb_grpc.ScheduleServiceStub) -> None:
    schedule_id = sid()
    await schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=cron_schedule(schedule_id)))
    error = await refused(
        schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=cron_schedule(schedule_id)))
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    request = spb.UpdateScheduleRequest(
        schedule=cron_schedule(schedule_id), update_mask={"paths": ["next_run_time"]}
    )
    error = await refused(schedules.UpdateSchedule(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "next_run_time" in (error.details() or "")
    await schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id=schedule_id))


async def test_permissions_and_visibility(runtime: Runtime, tmp_path: Path) -> None:
    security = Security(Authenticator(Callers.load(write_auth_file(tmp_path))))
    server, port = build_server(
        runtime.gateway, runtime.health, "127.0.0.1:0", security=security, schedules=runtime.schedules
    )
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = spb_grpc.ScheduleServiceStub(channel)
            schedule_id = sid()
            sleepy = cron_schedule(schedule_id)
            sleepy.task.task_name = "demo.sleep"
            sleepy.task.args.Clear()
            error = await refused(
                stub.CreateSchedule(spb.CreateScheduleRequest(schedule=sleepy), metadata=bearer("billing"))
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            mine = spb.CreateScheduleRequest(schedule=cron_schedule(schedule_id))
            await stub.CreateSchedule(mine, metadata=bearer("billing"))
            get = spb.GetScheduleRequest(schedule_id=schedule_id)
            error = await refused(stub.GetSchedule(get, metadata=bearer("other")))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            listed = await stub.ListSchedules(
                spb.ListSchedulesRequest(page_size=1000), metadata=bearer("other")
            )
            assert schedule_id not in [s.schedule_id for s in listed.schedules]
            seen = await stub.GetSchedule(get, metadata=bearer("reader"))  # read_all
            assert seen.schedule.schedule_id == schedule_id
            delete = spb.DeleteScheduleRequest(schedule_id=schedule_id)
            error = await refused(stub.DeleteSchedule(delete, metadata=bearer("reader")))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            await stub.DeleteSchedule(delete, metadata=bearer("billing"))
    finally:
        await server.stop(0)


async def buf_call(port: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """One unary call through server reflection alone (``buf curl``)."""
    process = await asyncio.create_subprocess_exec(
        str(buf_path()), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(body),
        f"http://127.0.0.1:{port}/taskgate.v1.ScheduleService/{method}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out or b"{}")
    return result


async def test_reflection_alone(schedule_port: int, tasks: pb_grpc.TaskServiceStub) -> None:
    schedule_id = sid()
    body = {
        "schedule": {
            "scheduleId": schedule_id,
            "cron": "*/5 * * * *",
            "timeZone": "America/New_York",
            "task": {"taskName": "demo.add", "args": [2, 3]},
        }
    }
    created = await buf_call(schedule_port, "CreateSchedule", body)
    assert created["schedule"]["cron"] == "*/5 * * * *"
    got = await buf_call(schedule_port, "GetSchedule", {"scheduleId": schedule_id})
    # within the lead (60 s) of a slot the gateway decides it ahead, and next_run_time moves on
    created_next = dt.datetime.fromisoformat(created["schedule"]["nextRunTime"])
    got_next = dt.datetime.fromisoformat(got["schedule"]["nextRunTime"])
    assert got_next in (created_next, created_next + dt.timedelta(minutes=5))
    listed = await buf_call(schedule_port, "ListSchedules", {"pageSize": 1000})
    assert schedule_id in [s["scheduleId"] for s in listed["schedules"]]
    update = {"schedule": {"scheduleId": schedule_id, "paused": True}, "updateMask": "paused"}
    assert (await buf_call(schedule_port, "UpdateSchedule", update))["schedule"]["paused"] is True
    triggered = await buf_call(schedule_port, "TriggerSchedule", {"scheduleId": schedule_id})
    assert (await wait_state(tasks, triggered["taskId"])).state == pb.TASK_STATE_SUCCEEDED
    assert await buf_call(schedule_port, "DeleteSchedule", {"scheduleId": schedule_id}) == {}


async def test_python_client(schedule_port: int) -> None:
    from taskgate import AsyncClient, NotFound

    schedule_id = sid()
    async with AsyncClient(f"127.0.0.1:{schedule_port}") as client:
        created = await client.create_schedule(
            schedule_id, "demo.add", args=[1, 2], interval=3600, paused=True
        )
        assert created.interval == dt.timedelta(hours=1) and created.paused and created.next_run_time is None
        assert (await client.get_schedule(schedule_id)).args == [1, 2]
        page = await client.list_schedules(page_size=1000)
        assert schedule_id in [s.schedule_id for s in page.schedules]
        resumed = await client.update_schedule(
            schedule_id, paused=False, cron="@daily", time_zone="Europe/Berlin"
        )
        assert resumed.cron == "0 0 * * *" and resumed.interval is None and resumed.next_run_time is not None
        task_id = await client.trigger_schedule(schedule_id)
        assert (await client.wait(task_id, timeout=30)).result == 3
        await client.delete_schedule(schedule_id)
        with pytest.raises(NotFound):
            await client.get_schedule(schedule_id)
