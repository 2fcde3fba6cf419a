"""Locked down: real tokens, a real server with the auth interceptor, real start-up checks."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy.engine import make_url

from service.api.auth import UNAUTHENTICATED_MESSAGE, Authenticator, Security, security_from_settings
from service.api.limits import ServiceLimits
from service.app import Runtime
from service.config import Settings
from service.domain.callers import Callers
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT, child_env
from tests.helpers import args
from tests.processes import gateway_process
from tests.security import (
    TOKENS,
    add,
    bearer,
    count_tasks,
    held_task,
    refused,
    secured_stub,
    serving,
    write_auth_file,
)


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_auth_file(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
async def channel(runtime: Runtime, auth_file: Path) -> AsyncIterator[aio.Channel]:
    security = Security(Authenticator(Callers.load(auth_file)))
    async with serving(runtime, security) as port, aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: aio.Channel) -> pb_grpc.TaskServiceStub:
    return pb_grpc.TaskServiceStub(channel)


# --- who is calling ---------------------------------------------------------------------


async def test_no_token_and_wrong_token_get_the_same_answer(stub: pb_grpc.TaskServiceStub) -> None:
    answers = [
        await refused(stub.Enqueue(add())),
        await refused(stub.Enqueue(add(), metadata=(("authorization", "Bearer not-a-token"),))),
        await refused(stub.Enqueue(add(), metadata=(("authorization", f"Basic {TOKENS['billing']}"),))),
        await refused(stub.GetStatus(pb.GetStatusRequest(task_id="x"), metadata=(("authorization", "x"),))),
    ]
    for error in answers:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == UNAUTHENTICATED_MESSAGE


async def test_garbage_without_a_token_is_refused_before_parsing(channel: aio.Channel) -> None:
    call = channel.unary_unary("/taskgate.v1.TaskService/Enqueue")
    error = await refused(call(b"\xff\xff\xff not a protobuf", timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_good_and_rotated_tokens_both_work(stub: pb_grpc.TaskServiceStub, runtime: Runtime) -> None:
    first = await stub.Enqueue(add(), metadata=bearer("billing"))
    second = await stub.Enqueue(add(), metadata=bearer("billing-new"))
    for task_id in (first.task_id, second.task_id):
        record = await runtime.store.get(task_id)
        assert record is not None and record.caller == "billing"


async def test_health_is_open_and_reflection_is_not(channel: aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status in (answer.SERVING, answer.NOT_SERVING)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")

    async def services(metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
        call = reflection.ServerReflectionInfo(iter([listing]), metadata=metadata, timeout=10)
        return [s.name async for r in call for s in r.list_services_response.service]

    with pytest.raises(aio.AioRpcError) as caught:
        await services()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "taskgate.v1.TaskService" in await services(bearer("reader"))


async def test_reflection_open_when_configured(runtime: Runtime, auth_file: Path) -> None:
    security = Security(Authenticator(Callers.load(auth_file), reflection_open=True))
    async with serving(runtime, security) as port, aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=10)]
        assert answers and answers[0].HasField("list_services_response")
        error = await refused(pb_grpc.TaskServiceStub(channel).Enqueue(add()))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# --- what a caller may do ---------------------------------------------------------------


async def test_task_outside_the_patterns_is_denied_and_not_recorded(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime
) -> None:
    before = await count_tasks(runtime, "billing")
    request = pb.EnqueueRequest(task_name="demo.sleep", args=args(0))
    error = await refused(stub.Enqueue(request, metadata=bearer("billing")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await refused(stub.EnqueueAt(held_task(), metadata=bearer("reader")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await count_tasks(runtime, "billing") == before
    assert await count_tasks(runtime, "reader") == 0


async def test_another_callers_task_is_not_found_unless_read_all(stub: pb_grpc.TaskServiceStub) -> None:
    task_id = (await stub.EnqueueAt(held_task(), metadata=bearer("billing"))).task_id
    unknown = str(uuid.uuid4())
    mine = await stub.GetStatus(pb.GetStatusRequest(task_id=task_id), metadata=bearer("billing"))
    assert mine.task.task_id == task_id

    details = []
    for target in (task_id, unknown):
        error = await refused(stub.GetStatus(pb.GetStatusRequest(task_id=target), metadata=bearer("other")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        details.append((error.details() or "").replace(target, "<id>"))
        stream = stub.StreamProgress(pb.StreamProgressRequest(task_id=target), metadata=bearer("other"))
        with pytest.raises(aio.AioRpcError) as caught:
            async for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        details.append((caught.value.details() or "").replace(target, "<id>"))
    assert len(set(details)) == 1

    seen = await stub.GetStatus(pb.GetStatusRequest(task_id=task_id), metadata=bearer("reader"))
    assert seen.task.state == pb.TASK_STATE_SCHEDULED
    stream = stub.StreamProgress(pb.StreamProgressRequest(task_id=task_id), metadata=bearer("reader"))
    first = await stream.read()
    assert isinstance(first, pb.StreamProgressResponse) and first.task.task_id == task_id
    stream.cancel()


async def test_request_id_is_unique_per_caller(stub: pb_grpc.TaskServiceStub) -> None:
    request_id = f"order-{uuid.uuid4()}"
    billing = await stub.Enqueue(add(request_id=request_id), metadata=bearer("billing"))
    other = await stub.Enqueue(add(request_id=request_id), metadata=bearer("other"))
    again = await stub.Enqueue(add(request_id=request_id), metadata=bearer("billing-new"))
    assert billing.task_id != other.task_id and not other.deduplicated
    assert again.deduplicated and again.task_id == billing.task_id


async def test_over_the_rate_is_resource_exhausted_with_retry_info(stub: pb_grpc.TaskServiceStub) -> None:
    await stub.Enqueue(add(), metadata=bearer("slow"))
    error = await refused(stub.Enqueue(add(), metadata=bearer("slow")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = [value for key, value in error.trailing_metadata() or () if key == "grpc-status-details-bin"]
    assert len(raw) == 1 and isinstance(raw[0], bytes)
    status = status_pb2.Status.FromString(raw[0])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToTimedelta() > dt.timedelta(0)
    assert info.retry_delay.ToTimedelta() <= dt.timedelta(seconds=5)


async def test_audit_line_without_arguments_and_no_token_in_logs(
    stub: pb_grpc.TaskServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = secrets.token_urlsafe(24)
    with caplog.at_level(logging.DEBUG):
        accepted = await stub.Enqueue(add(918273, 645372, "audit-1"), metadata=bearer("billing"))
        await refused(stub.Enqueue(add(), metadata=(("authorization", f"Bearer {wrong}"),)))
        denied = pb.EnqueueRequest(task_name="demo.sleep", args=args(777111))
        await refused(stub.Enqueue(denied, metadata=bearer("billing")))
    audit = [r.getMessage() for r in caplog.records if r.name == "taskgate.audit"]
    line = next(m for m in audit if accepted.task_id in m)
    assert "caller='billing'" in line and "task_name='demo.add'" in line and "request_id='audit-1'" in line
    assert any("task_name='demo.sleep'" in m and "PERMISSION_DENIED" in m for m in audit)
    for secret in ("918273", "645372", "777111"):
        assert not any(secret in m for m in audit)
    for token in (*TOKENS.values(), wrong):
        assert token not in caplog.text


# --- streams: deadlines and limits --------------------------------------------------------


async def wait_watchers(runtime: Runtime, count: int) -> None:
    async with asyncio.timeout(10):
        while runtime.hub.watcher_count != count:
            await asyncio.sleep(0.05)


async def test_stream_past_its_deadline_frees_its_inbox(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime
) -> None:
    baseline = runtime.hub.watcher_count
    task_id = (await stub.EnqueueAt(held_task(), metadata=bearer("billing"))).task_id
    request = pb.StreamProgressRequest(task_id=task_id)
    stream = stub.StreamProgress(request, metadata=bearer("billing"), timeout=1.0)
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_watchers(runtime, baseline)


async def test_stream_lifetime_limit(runtime: Runtime, auth_file: Path) -> None:
    baseline = runtime.hub.watcher_count
    async with secured_stub(runtime, auth_file, ServiceLimits(stream_lifetime=0.5)) as stub:
        task_id = (await stub.EnqueueAt(held_task(), metadata=bearer("billing"))).task_id
        stream = stub.StreamProgress(pb.StreamProgressRequest(task_id=task_id), metadata=bearer("billing"))
        with pytest.raises(aio.AioRpcError) as caught:
            async for _ in stream:
                pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "stream lifetime" in (caught.value.details() or "")
    await wait_watchers(runtime, baseline)


async def test_open_streams_per_caller_limit(runtime: Runtime, auth_file: Path) -> None:
    baseline = runtime.hub.watcher_count
    async with secured_stub(runtime, auth_file, ServiceLimits(max_streams_per_caller=2)) as stub:
        task_id = (await stub.EnqueueAt(held_task(), metadata=bearer("billing"))).task_id
        request = pb.StreamProgressRequest(task_id=task_id)
        streams = [stub.StreamProgress(request, metadata=bearer("billing")) for _ in range(2)]
        for stream in streams:
            await stream.read()
        third = stub.StreamProgress(request, metadata=bearer("billing-new"))
        with pytest.raises(aio.AioRpcError) as caught:
            await third.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 per caller (TASKGATE_MAX_STREAMS_PER_CALLER)" in (caught.value.details() or "")
        reader = stub.StreamProgress(request, metadata=bearer("reader"))
        assert isinstance(await reader.read(), pb.StreamProgressResponse)
        for stream in (*streams, reader):
            stream.cancel()
        await wait_watchers(runtime, baseline)


# --- hostile input ------------------------------------------------------------------------


async def test_request_limits_name_the_limit(channel: aio.Channel) -> None:
    stub = pb_grpc.TaskServiceStub(channel)
    big_args = pb.EnqueueRequest(task_name="demo.add", args=args("x" * 300_000, 1))
    error = await refused(stub.Enqueue(big_args, metadata=bearer("billing")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "; the limit is 262144 (TASKGATE_MAX_ARGS_BYTES)" in (error.details() or "")
    deep: list[object] = [1]
    for _ in range(40):
        deep = [deep]
    error = await refused(stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(deep, 1))))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # credentials first, before anything else
    error = await refused(
        stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(deep, 1)), metadata=bearer("billing"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nested deeper than 32 levels (TASKGATE_MAX_ARGS_DEPTH)" in (error.details() or "")
    too_big = pb.EnqueueRequest(task_name="demo.add", args=args("x" * (1024 * 1024 + 1), 1))
    error = await refused(stub.Enqueue(too_big, metadata=bearer("billing")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bad_name = pb.EnqueueRequest(task_name="demo.add\r\nforged log line", args=args(1, 2))
    error = await refused(stub.Enqueue(bad_name, metadata=bearer("other")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "task_name" in (error.details() or "")


# --- start-up ---------------------------------------------------------------------------------


async def serve_once(settings: Settings, **env: str) -> tuple[int, str]:
    environment = child_env(settings, **env)
    if "TASKGATE_AUTH_FILE" not in env:
        environment.pop("TASKGATE_AUTH_FILE", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve",
        cwd=ROOT, env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_open_mode_refuses_a_public_address(settings: Settings) -> None:
    code, output = await serve_once(settings, TASKGATE_LISTEN="0.0.0.0:0")
    assert code != 0
    assert "refusing to listen on 0.0.0.0:0 without TASKGATE_AUTH_FILE" in output
    assert "taskgate listening" not in output


def test_open_mode_warns_and_allow_insecure_lets_it_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.api.auth"):
        security = security_from_settings(Settings(listen="0.0.0.0:0", allow_insecure=True))
    assert security.authenticator.is_open
    assert "OPEN MODE" in caplog.text


async def test_malformed_auth_file_stops_start_up(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "bad-callers.toml"
    bad.write_text('[callers.billing]\ntoken_sha256 = "my-clear-text-token"\n')
    code, output = await serve_once(settings, TASKGATE_AUTH_FILE=str(bad))
    assert code == 2
    assert str(bad) in output and "token_sha256" in output
    bad.write_text("[callers.billing\n")
    code, output = await serve_once(settings, TASKGATE_AUTH_FILE=str(bad))
    assert code == 2 and str(bad) in output and "not valid TOML" in output


async def test_a_secured_process_hides_its_secrets(settings: Settings, auth_file: Path) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    url = make_url(settings.database_url).set(password=password).render_as_string(hide_password=False)
    async with gateway_process(settings, TASKGATE_AUTH_FILE=str(auth_file), DATABASE_URL=url) as gateway:
        async with aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            assert (await stub.Enqueue(add(), metadata=bearer("billing"), timeout=10)).task_id
            error = await refused(stub.Enqueue(add(), metadata=(("authorization", "Bearer nope"),)))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        await gateway.stop()
    output = gateway.output.decode(errors="replace")
    assert "database postgresql+asyncpg://postgres:***@" in output
    assert password not in output and TOKENS["billing"] not in output


async def test_a_batch_with_a_forbidden_task_is_denied_whole(
    stub: pb_grpc.TaskServiceStub, runtime: Runtime
) -> None:
    before = await count_tasks(runtime, "billing")
    batch = pb.EnqueueBatchRequest(
        tasks=[
            pb.BatchTask(task_name="demo.add", args=args(1, 2)),
            pb.BatchTask(task_name="demo.sleep", args=args(0)),
            pb.BatchTask(task_name="demo.nope"),
        ]
    )
    error = await refused(stub.EnqueueBatch(batch, metadata=bearer("billing")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (error.details() or "").startswith("tasks[1]: ")
    assert await count_tasks(runtime, "billing") == before


async def test_a_batch_counts_every_task_against_the_rate(stub: pb_grpc.TaskServiceStub) -> None:
    batch = pb.EnqueueBatchRequest(tasks=[pb.BatchTask(task_name="demo.add", args=args(1, 2))] * 3)
    await stub.EnqueueBatch(batch, metadata=bearer("batcher"))  # a full bucket: passes, left in debt
    error = await refused(stub.Enqueue(add(), metadata=bearer("batcher")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
