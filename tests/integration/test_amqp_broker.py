"""The broker-sensitive paths on Redis and on RabbitMQ: publish, hold, batch, expire, outage.

Every test runs a real gateway process and a real Celery worker on the broker of its
parameter (the result backend is Redis either way); executions are counted on the worker's
side with ``demo.record``. The RabbitMQ-only tests stop the node (``rabbitmqctl
stop_app``) and start it again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import uuid
from pathlib import Path

import aio_pika
import pytest
from google.protobuf import timestamp_pb2

from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests import amqp_fixtures
from tests.amqp_fixtures import (
    FAST,
    broker_worker,
    is_amqp,
    rabbitmqctl,
    run_order,
    stub_for,
    wait_runs,
)
from tests.helpers import args, value, wait_state
from tests.processes import gateway_process

# the fixtures this module uses (Redis and RabbitMQ)
amqp_vhost = amqp_fixtures.amqp_vhost
broker_settings = amqp_fixtures.broker_settings


def ts(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def record(tag: str, **options: object) -> pb.EnqueueRequest:
    return pb.EnqueueRequest(task_name="demo.record", args=args(tag), **options)  # type: ignore[arg-type]


async def test_enqueue_batch_and_held_tasks_run_once(broker_settings: Settings, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    batch_tags = [f"batch-{run}-{i}" for i in range(50)]
    held_tags = [f"held-{run}-{i}" for i in range(10)]
    with broker_worker(broker_settings, tmp_path):
        async with (
            gateway_process(broker_settings, TASKGATE_SCHEDULE_HORIZON="1", **FAST) as gateway,
            stub_for(gateway) as stub,
        ):
            added = await stub.Enqueue(pb.EnqueueRequest(task_name="demo.add", args=args(2, 3)))
            batch = [pb.BatchTask(task_name="demo.record", args=args(tag)) for tag in batch_tags]
            await stub.EnqueueBatch(pb.EnqueueBatchRequest(tasks=batch))
            run_time = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
            for tag in held_tags:
                at = pb.EnqueueAtRequest(task_name="demo.record", args=args(tag), run_time=ts(run_time))
                assert (await stub.EnqueueAt(at)).state == pb.TASK_STATE_SCHEDULED
            task = await wait_state(stub, added.task_id)
            assert task.state == pb.TASK_STATE_SUCCEEDED and value(task.result) == 5
            counts = await wait_runs(broker_settings, batch_tags + held_tags)
    assert all(counts[tag] == 1 for tag in batch_tags + held_tags)


async def test_an_expired_task_ends_cancelled(broker_settings: Settings, tmp_path: Path) -> None:
    async with gateway_process(broker_settings, **FAST) as gateway, stub_for(gateway) as stub:
        expire = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        request = pb.EnqueueRequest(task_name="demo.add", args=args(1, 1), expire_time=ts(expire))
        accepted = await stub.Enqueue(request)
        await asyncio.sleep(2.5)  # expired in the queue, no worker yet
        with broker_worker(broker_settings, tmp_path):
            task = await wait_state(stub, accepted.task_id, timeout=60)
    assert task.state == pb.TASK_STATE_CANCELLED


async def queue_depth(url: str, queue: str = "celery") -> int:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def test_priorities_order_a_backlog_on_rabbitmq(broker_settings: Settings, tmp_path: Path) -> None:
    if not is_amqp(broker_settings):
        pytest.skip("RabbitMQ priorities (Redis has its own, inverted, priority steps)")
    priority = {"TASKGATE_QUEUE_MAX_PRIORITY": "10"}
    run = uuid.uuid4().hex[:6]
    low = [f"low-{run}-{i}" for i in range(20)]
    high = [f"high-{run}-{i}" for i in range(20)]
    async with gateway_process(broker_settings, **priority, **FAST) as gateway, stub_for(gateway) as stub:
        for tag in low:
            await stub.Enqueue(record(tag, priority=0))
        for tag in high:
            await stub.Enqueue(record(tag, priority=9))
        async with asyncio.timeout(30):
            while await queue_depth(broker_settings.broker_url) < 40:
                await asyncio.sleep(0.2)
        with broker_worker(broker_settings, tmp_path, concurrency=1, **priority):
            await wait_runs(broker_settings, low + high)
    order = run_order(broker_settings)
    assert set(order[:20]) == set(high), order


async def test_tasks_accepted_while_rabbitmq_is_down_run_once_when_it_returns(
    broker_settings: Settings, tmp_path: Path
) -> None:
    if not is_amqp(broker_settings):
        pytest.skip("the Redis case is tests/integration/test_outbox.py")
    tags = [f"down-{uuid.uuid4().hex[:6]}-{i}" for i in range(100)]
    async with gateway_process(broker_settings, **FAST) as gateway, stub_for(gateway) as stub:
        rabbitmqctl("stop_app")
        try:
            accepted = await asyncio.gather(*(stub.Enqueue(record(tag)) for tag in tags))
            assert all(a.state == pb.TASK_STATE_QUEUED for a in accepted)
        finally:
            rabbitmqctl("start_app")
        with broker_worker(broker_settings, tmp_path):
            counts = await wait_runs(broker_settings, tags)
            await wait_state(stub, accepted[-1].task_id)
    assert all(counts[tag] == 1 for tag in tags)


async def enqueue_load(stub: pb_grpc.TaskServiceStub, tags: list[str], accepted: list[str]) -> None:
    """Enqueue ``tags`` 20 at a time, 50 ms apart; record the tags the gateway accepted."""
    for start in range(0, len(tags), 20):
        chunk = tags[start : start + 20]
        await asyncio.gather(*(stub.Enqueue(record(tag)) for tag in chunk))
        accepted.extend(chunk)
        await asyncio.sleep(0.05)


def queue_report(settings: Settings) -> str:
    """The vhost's queues as ``rabbitmqctl list_queues`` shows them (for a failure's report)."""
    vhost = settings.broker_url.rsplit("/", 1)[1]
    columns = ("name", "messages_ready", "messages_unacknowledged", "consumers")
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, *columns], capture_output=True, text=True, timeout=60
    )
    return listed.stdout + listed.stderr


# a RabbitMQ node restart plus 1,000 tasks: minutes on a loaded CI machine, bounded here
@pytest.mark.timeout(420)
async def test_a_rabbitmq_restart_under_load_loses_and_repeats_nothing(
    broker_settings: Settings, tmp_path: Path
) -> None:
    if not is_amqp(broker_settings):
        pytest.skip("RabbitMQ restart")
    tags = [f"restart-{uuid.uuid4().hex[:6]}-{i}" for i in range(1000)]
    accepted: list[str] = []
    with broker_worker(broker_settings, tmp_path) as worker_log:
        async with gateway_process(broker_settings, **FAST) as gateway, stub_for(gateway) as stub:
            try:
                load = asyncio.create_task(enqueue_load(stub, tags, accepted))
                await asyncio.sleep(1.0)
                await asyncio.to_thread(rabbitmqctl, "stop_app")
                await asyncio.sleep(1.0)
                await asyncio.to_thread(rabbitmqctl, "start_app")
                await load
                counts = await wait_runs(broker_settings, accepted, timeout=180)
            finally:
                (tmp_path / "gateway.log").write_bytes(gateway.output)
                (tmp_path / "queues.txt").write_text(await asyncio.to_thread(queue_report, broker_settings))
        assert b"left in the outbox" in gateway.output  # the restart did hit the publishing
    assert accepted == tags  # every Enqueue answered OK, outage or not
    lost = [tag for tag in tags if counts[tag] == 0]
    repeated = [tag for tag in tags if counts[tag] > 1]
    assert (lost, repeated) == ([], []), worker_log.read_text()[-3000:]
