"""A dead consumer's unacked messages (service.broker.inspect): found by age, restored once."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from service.broker.inspect import BrokerInspector, redelivery, task_id_of
from service.broker.redis_message import RedisLayout, build_message
from service.domain.model import Delivery
from tests.conftest import REDIS_URL

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def entry(task_id: str, queue: str = "jobs", priority: int | None = None) -> bytes:
    delivery = Delivery(task_id, "demo.add", [1, 2], {}, NOW, queue=queue, priority=priority)
    return orjson.dumps([orjson.loads(build_message(delivery, RedisLayout(), NOW)), "", queue])


def test_a_redelivery_is_flagged_as_kombu_flags_it() -> None:
    again = redelivery(entry("t-1", priority=9))
    assert again is not None
    message, priority = again
    document = orjson.loads(message)
    assert priority == 9
    assert document["headers"]["redelivered"] is True
    assert document["properties"]["delivery_info"]["redelivered"] is True
    assert task_id_of(message) == "t-1"


@pytest.mark.parametrize("raw", [b"junk", b"[]", b"{}", b"[1]"])
def test_an_entry_without_a_message_is_not_restored(raw: bytes) -> None:
    assert redelivery(raw) is None


@pytest.fixture
async def broker() -> AsyncIterator[tuple[aioredis.Redis, BrokerInspector, str]]:
    prefix = f"tgrestore-{uuid.uuid4().hex[:8]}-"
    client = aioredis.Redis.from_url(REDIS_URL)
    inspector = BrokerInspector(aioredis.Redis.from_url(REDIS_URL), RedisLayout(key_prefix=prefix), chunk=2)
    yield client, inspector, prefix
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    await inspector.aclose()


async def take(client: aioredis.Redis, prefix: str, tag: str, raw: bytes, when: float) -> None:
    """What kombu's ``QoS.append`` writes when a consumer takes a message."""
    await client.zadd(f"{prefix}unacked_index", {tag: when})
    await client.hset(f"{prefix}unacked", tag, raw)


async def popped_id(client: aioredis.Redis, key: str) -> str | None:
    """The task id of the message a worker's BRPOP would take next from ``key``."""
    raw = await client.rpop(key)
    assert isinstance(raw, bytes)
    return task_id_of(raw)


async def test_taken_reads_only_entries_taken_before_the_bound(
    broker: tuple[aioredis.Redis, BrokerInspector, str],
) -> None:
    client, inspector, prefix = broker
    for i in range(5):
        await take(client, prefix, f"old-{i}", entry(f"old{i}"), 100.0 + i)
    await take(client, prefix, "new", entry("new"), 500.0)
    found = await inspector.taken({"old0", "old4", "new", "absent"}, before=200.0)
    assert found is not None
    assert sorted(found) == ["old0", "old4"]
    assert found["old4"].tag == "old-4" and found["old4"].taken_at == 104.0
    assert (
        await BrokerInspector(client, RedisLayout(key_prefix=prefix), chunk=2, budget=2).taken(
            {"old4"}, before=200.0
        )
        is None
    )  # over the budget: unknown


async def test_restore_moves_the_message_once_and_atomically(
    broker: tuple[aioredis.Redis, BrokerInspector, str],
) -> None:
    client, inspector, prefix = broker
    await take(client, prefix, "tag-a", entry("a"), 100.0)
    await take(client, prefix, "tag-b", entry("b", priority=9), 100.0)
    await take(client, prefix, "tag-c", entry("c"), 100.0)
    found = await inspector.taken({"a", "b", "c"}, before=200.0)
    assert found is not None
    await client.lpush(f"{prefix}jobs", b"older")
    assert await inspector.restore(found["a"], "jobs")
    assert await inspector.restore(found["b"], "jobs")
    assert not await inspector.restore(found["a"], "jobs")  # already restored: nothing twice
    await client.zrem(f"{prefix}unacked_index", "tag-c")  # acked meanwhile (kombu's ack): left alone
    await client.hdel(f"{prefix}unacked", "tag-c")
    assert not await inspector.restore(found["c"], "jobs")
    # RPUSH: the restored message is the next BRPOP takes, as kombu's restore_by_tag does
    assert await popped_id(client, f"{prefix}jobs") == "a"
    assert await popped_id(client, f"{prefix}jobs\x06\x169") == "b"
    assert await client.hlen(f"{prefix}unacked") == 0
    assert await client.zcard(f"{prefix}unacked_index") == 0
    assert await client.llen(f"{prefix}jobs") == 1  # only the message that was there before


async def test_holders_is_unknown_without_a_celery_app(
    broker: tuple[aioredis.Redis, BrokerInspector, str],
) -> None:
    _, inspector, _ = broker
    assert await inspector.holders({"a"}) is None
