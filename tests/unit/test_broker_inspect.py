"""Which task ids a Redis broker holds (service.broker.inspect): parsing, and reading a real Redis."""

from __future__ import annotations

import datetime as dt
import uuid

import orjson
import pytest
import redis.asyncio as aioredis

from service.broker.inspect import BrokerInspector, task_id_of, task_ids_of
from service.broker.redis_message import RedisLayout, build_message
from service.domain.model import Delivery
from tests.conftest import REDIS_URL

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def message(task_id: str, priority: int | None = None, queue: str = "") -> bytes:
    delivery = Delivery(task_id, "demo.add", [1, 2], {}, NOW, queue=queue, priority=priority)
    return build_message(delivery, RedisLayout(), NOW)


def test_a_queued_message_names_its_task() -> None:
    assert task_id_of(message("t-1")) == "t-1"


def test_an_unacked_entry_names_its_task() -> None:
    entry = orjson.dumps([orjson.loads(message("t-2")), "", "celery"])
    assert task_id_of(entry) == "t-2"


def test_protocol_1_style_correlation_id_is_enough() -> None:
    assert task_id_of(orjson.dumps({"headers": {}, "properties": {"correlation_id": "t-3"}})) == "t-3"


@pytest.mark.parametrize("raw", [b"not json", b"[]", b"42", b'{"headers": {"id": 5}}', b"[1, 2]"])
def test_what_names_no_task_is_skipped(raw: bytes) -> None:
    assert task_id_of(raw) is None


def test_many_at_once() -> None:
    assert task_ids_of([message("a"), b"junk", message("b")]) == {"a", "b"}


async def test_held_reads_queue_priority_lists_and_unacked_hash() -> None:
    prefix = f"tginspect-{uuid.uuid4().hex[:8]}-"
    layout = RedisLayout(key_prefix=prefix)
    client = aioredis.Redis.from_url(REDIS_URL)
    inspector = BrokerInspector(client, layout, chunk=2)
    try:
        await client.lpush(f"{prefix}jobs", *(message(f"q{i}", queue="jobs") for i in range(5)))
        await client.lpush(f"{prefix}jobs\x06\x169", message("urgent", priority=9, queue="jobs"))
        entry = orjson.dumps([orjson.loads(message("taken", queue="jobs")), "", "jobs"])
        await client.hset(f"{prefix}unacked", "tag-1", entry)
        wanted = {"q0", "q4", "urgent", "taken", "gone"}
        assert await inspector.held(["jobs"], wanted) == {"q0", "q4", "urgent", "taken"}
        assert await inspector.held([""], {"q0"}) == set()  # the default queue holds nothing
        small = BrokerInspector(client, layout, chunk=2, budget=3)
        assert await small.held(["jobs"], {"gone"}) is None  # over the budget: unknown
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await inspector.aclose()
