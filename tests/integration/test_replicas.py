"""Three gateway replicas on one database and one broker (Redis and RabbitMQ).

Enqueue load is spread over the three; held tasks (beyond the horizon) are claimed by
whichever relay gets to them first (``FOR UPDATE SKIP LOCKED``). One replica is killed
(SIGKILL) in the middle: what it accepted but had not marked is relayed by the others after
the lease. Every accepted task runs exactly once, counted on the workers' side.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import uuid
from pathlib import Path

import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from service.config import Settings
from service.store.tasks import TaskStore, tasks
from taskgate.v1 import task_service_pb2 as pb
from tests import amqp_fixtures
from tests.amqp_fixtures import FAST, broker_worker, stub_for, wait_runs
from tests.helpers import args
from tests.processes import gateway_process, start_gateway

amqp_vhost = amqp_fixtures.amqp_vhost
broker_settings = amqp_fixtures.broker_settings


def ts(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def record(tag: str) -> pb.EnqueueRequest:
    return pb.EnqueueRequest(task_name="demo.record", args=args(tag))


async def publish_attempts(settings: Settings, task_ids: list[str]) -> list[int]:
    store = TaskStore.connect(settings.database_url)
    try:
        async with store.engine.connect() as conn:
            query = sa.select(tasks.c.publish_attempts).where(tasks.c.task_id.in_(task_ids))
            return list((await conn.execute(query)).scalars())
    finally:
        await store.close()


async def test_three_replicas_run_every_accepted_task_once(broker_settings: Settings, tmp_path: Path) -> None:
    env = {"TASKGATE_SCHEDULE_HORIZON": "1", **FAST}
    run = uuid.uuid4().hex[:6]
    load = [f"load-{run}-{i}" for i in range(900)]
    held = [f"held-{run}-{i}" for i in range(60)]
    doomed_tags = [f"doomed-{run}-{i}" for i in range(100)]
    with broker_worker(broker_settings, tmp_path):
        async with (
            gateway_process(broker_settings, **env) as first,
            gateway_process(broker_settings, **env) as second,
            stub_for(first) as stub_a,
            stub_for(second) as stub_b,
        ):
            doomed = await start_gateway(broker_settings, **env)
            async with stub_for(doomed) as stub_c:
                stubs = (stub_a, stub_b, stub_c)
                run_time = ts(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4))
                held_ids = [
                    (
                        await stubs[i % 3].EnqueueAt(
                            pb.EnqueueAtRequest(task_name="demo.record", args=args(tag), run_time=run_time)
                        )
                    ).task_id
                    for i, tag in enumerate(held)
                ]
                for start in range(0, len(load), 90):
                    chunk = load[start : start + 90]
                    await asyncio.gather(*(stubs[i % 3].Enqueue(record(tag)) for i, tag in enumerate(chunk)))
                await asyncio.gather(*(stub_c.Enqueue(record(tag)) for tag in doomed_tags))
            await doomed.stop(signal.SIGKILL)
            counts = await wait_runs(broker_settings, load + held + doomed_tags, timeout=180)
    assert all(counts[tag] == 1 for tag in load + held + doomed_tags), [
        (tag, counts[tag]) for tag in load + held + doomed_tags if counts[tag] != 1
    ]
    assert await publish_attempts(broker_settings, held_ids) == [1] * len(held)  # each claimed once
