"""ListTasks against the real stack: filters, order, keyset pages under inserts, isolation."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path

import grpc
import pytest
from grpc import aio

from service.app import Runtime
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args, wait_state
from tests.security import bearer, refused, secured_stub, write_auth_file


def tag() -> str:
    return f"lst-{uuid.uuid4().hex[:8]}"


async def add_tasks(stub: pb_grpc.TaskServiceStub, queue: str, count: int, prefix: str = "") -> list[str]:
    """``count`` demo.add tasks on ``queue`` (no worker reads it: they stay QUEUED), in order."""
    ids = []
    for i in range(count):
        request = pb.EnqueueRequest(
            task_name="demo.add", args=args(i, 1), queue=queue, request_id=f"{prefix}{i}" if prefix else ""
        )
        ids.append((await stub.Enqueue(request)).task_id)
    return ids


async def list_all(
    stub: pb_grpc.TaskServiceStub, flt: str, order_by: str = "", page_size: int = 0
) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        request = pb.ListTasksRequest(filter=flt, order_by=order_by, page_size=page_size, page_token=token)
        page = await stub.ListTasks(request)
        ids += [task.task_id for task in page.tasks]
        token = page.next_page_token
        if not token:
            return ids


async def test_newest_first_by_default_and_oldest_first_on_request(stub: pb_grpc.TaskServiceStub) -> None:
    queue = tag()
    ids = await add_tasks(stub, queue, 5)
    assert await list_all(stub, f'queue = "{queue}"') == ids[::-1]
    assert await list_all(stub, f"queue = {queue}", order_by="create_time") == ids
    assert await list_all(stub, f"queue = {queue}", order_by="create_time desc", page_size=2) == ids[::-1]


async def test_keyset_pages_skip_and_repeat_nothing_while_tasks_arrive(stub: pb_grpc.TaskServiceStub) -> None:
    queue = tag()
    await add_tasks(stub, queue, 12)
    for order_by in ("create_time", ""):
        expected = await list_all(stub, f"queue = {queue}", order_by=order_by)
        seen: list[str] = []
        token = ""
        while True:
            request = pb.ListTasksRequest(
                filter=f"queue = {queue}", order_by=order_by, page_size=3, page_token=token
            )
            page = await stub.ListTasks(request)
            seen += [task.task_id for task in page.tasks]
            await add_tasks(stub, queue, 2)  # inserts between pages
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)), "a task was repeated"
        if order_by == "":
            assert seen == expected  # newest first: later tasks sort before the first page
        else:
            assert seen[: len(expected)] == expected  # oldest first: later tasks come after


async def test_every_operator(stub: pb_grpc.TaskServiceStub) -> None:
    queue = tag()
    ids = await add_tasks(stub, queue, 3, prefix="rq-")  # once per run: each run has its own database
    done = (
        await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(1, 1), request_id=queue))
    ).task_id
    finished = await wait_state(stub, done)
    first = (await stub.GetStatus(pb.GetStatusRequest(task_id=ids[0]))).task
    middle = first.create_time.ToDatetime(tzinfo=dt.UTC).isoformat()
    q = f"queue = {queue}"
    cases = {
        f"{q} AND request_id = rq-1": [ids[1]],
        f"{q} AND request_id != rq-1": [ids[2], ids[0]],
        f'{q} AND create_time > "{middle}"': [ids[2], ids[1]],
        f'{q} AND create_time >= "{middle}"': ids[::-1],
        f'{q} AND create_time < "{middle}"': [],
        f'{q} AND create_time <= "{middle}"': [ids[0]],
        f"{q} AND state = QUEUED": ids[::-1],
        f"{q} AND state = TASK_STATE_QUEUED AND NOT request_id = rq-0": [ids[2], ids[1]],
        f"{q} AND -request_id = rq-0": [ids[2], ids[1]],
        f"{q} AND request_id = rq-0 OR request_id = rq-2": [ids[2], ids[0]],
        f"{q} AND (request_id = rq-0 OR request_id = rq-2) AND NOT (request_id = rq-2)": [ids[0]],
        f"{q} AND task_name = demo.* AND request_id = rq*": ids[::-1],
        f"{q} AND task_name != demo.*": [],
        f"{q} AND request_id > rq-1": [ids[2]],
        f"{q} AND end_time > 2000-01-01T00:00:00Z": [],
        f"request_id = {queue} AND state = SUCCEEDED AND end_time > 2000-01-01T00:00:00Z": [done],
        f"request_id = {queue} AND state != SUCCEEDED": [],
    }
    for flt, expected in cases.items():
        assert await list_all(stub, flt) == expected, flt
    assert finished.state == pb.TASK_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (pb.ListTasksRequest(filter="state = "), "position 9"),
        (pb.ListTasksRequest(filter="colour = red"), "unknown field 'colour'"),
        (pb.ListTasksRequest(filter="state = DONE"), "unknown state"),
        (pb.ListTasksRequest(filter="create_time > yesterday"), "RFC 3339"),
        (pb.ListTasksRequest(filter="(queue = a"), "expected ')'"),
        (pb.ListTasksRequest(page_size=-1), "page_size"),
        (pb.ListTasksRequest(order_by="task_name"), "order_by"),
        (pb.ListTasksRequest(page_token="not-a-token"), "page_token"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    stub: pb_grpc.TaskServiceStub, request_: pb.ListTasksRequest, fragment: str
) -> None:
    error = await refused(stub.ListTasks(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (error.details() or "")


async def test_a_token_is_bound_to_its_filter_and_order(stub: pb_grpc.TaskServiceStub) -> None:
    queue = tag()
    await add_tasks(stub, queue, 3)
    page = await stub.ListTasks(pb.ListTasksRequest(filter=f"queue = {queue}", page_size=1))
    assert page.next_page_token
    for other in (
        pb.ListTasksRequest(filter=f"queue = {queue}x", page_size=1, page_token=page.next_page_token),
        pb.ListTasksRequest(
            filter=f"queue = {queue}", order_by="create_time", page_size=1, page_token=page.next_page_token
        ),
    ):
        error = await refused(stub.ListTasks(other))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_page_size_default_and_cap(stub: pb_grpc.TaskServiceStub) -> None:
    queue = tag()
    await asyncio.gather(*(add_tasks(stub, queue, 13) for _ in range(4)))  # 52 tasks
    page = await stub.ListTasks(pb.ListTasksRequest(filter=f"queue = {queue}"))
    assert len(page.tasks) == 50 and page.next_page_token
    page = await stub.ListTasks(pb.ListTasksRequest(filter=f"queue = {queue}", page_size=5000))
    assert len(page.tasks) == 52 and not page.next_page_token


async def test_a_caller_without_read_all_lists_only_its_own(runtime: Runtime, tmp_path: Path) -> None:
    queue = tag()
    async with secured_stub(runtime, write_auth_file(tmp_path)) as secured:
        mine = (
            await secured.Enqueue(
                pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue=queue),
                metadata=bearer("billing"),
            )
        ).task_id
        theirs = (
            await secured.Enqueue(
                pb.EnqueueRequest(task_name="demo.add", args=args(1, 2), queue=queue),
                metadata=bearer("other"),
            )
        ).task_id
        request = pb.ListTasksRequest(filter=f"queue = {queue}")
        billing = await secured.ListTasks(request, metadata=bearer("billing"))
        reader = await secured.ListTasks(request, metadata=bearer("reader"))
    assert [task.task_id for task in billing.tasks] == [mine]
    assert [task.task_id for task in reader.tasks] == [theirs, mine]


async def test_list_through_reflection_names(channel: aio.Channel) -> None:
    method = channel.unary_unary(
        "/taskgate.v1.TaskService/ListTasks",
        request_serializer=pb.ListTasksRequest.SerializeToString,
        response_deserializer=pb.ListTasksResponse.FromString,
    )
    response = await method(pb.ListTasksRequest(page_size=1))
    assert len(response.tasks) <= 1
