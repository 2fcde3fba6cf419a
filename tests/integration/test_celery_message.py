"""The hand-built Celery message is the one ``send_task`` stores, list and fields alike."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from service.broker.publisher import RedisPublisher, send_only_app, send_options
from service.domain.model import Delivery
from taskgate.worker.contract import CelerySettings

#: Fields that differ between any two sends: a fresh tag, the sender's identity.
_VOLATILE = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "origin")}

NOW = dt.datetime.now(dt.UTC)

CASES = {
    "plain": Delivery(task_id="", task_name="demo.add", args=[2, 3], kwargs={}, run_time=NOW),
    "no-args": Delivery(task_id="", task_name="demo.add", args=[], kwargs={"a": 1, "b": "é"}, run_time=NOW),
    "everything": Delivery(
        task_id="",
        task_name="demo.add",
        args=[1, {"nested": [1.5, None, True]}],
        kwargs={},
        # a day ahead: still in the future however long the suite ran before this test
        run_time=NOW + dt.timedelta(days=1),
        queue="other",
        priority=5,
        expire_time=NOW + dt.timedelta(days=2),
        headers={"x-trace": "abc"},
    ),
    "top-priority": Delivery(task_id="", task_name="demo.add", args=[], kwargs={}, run_time=NOW, priority=9),
    "zero-priority": Delivery(task_id="", task_name="demo.add", args=[], kwargs={}, run_time=NOW, priority=0),
}


@pytest.fixture
def broker(settings: CelerySettings) -> Iterator[tuple[CelerySettings, redis.Redis]]:
    prefix = f"{settings.key_prefix}msg-{uuid.uuid4().hex[:8]}-"
    private = settings.model_copy(update={"key_prefix": prefix})
    client = redis.Redis.from_url(private.broker_url)
    yield private, client
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def _stored(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every list and set under ``prefix``: lists decoded (body included), sets as sorted lists."""
    found: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{prefix}*"):
        name = key.decode()[len(prefix) :]
        if client.type(key) == b"list":
            messages = []
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                message["body"] = json.loads(base64.b64decode(message["body"]))
                for section, field in _VOLATILE:
                    assert message[section].pop(field)
                messages.append(message)
            found[name] = messages
        else:
            found[name] = sorted(member.decode() for member in client.smembers(key))
    return found


def _expiration_close(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """``expiration`` is milliseconds left, computed at send time: equal within a second."""
    for key, messages in ours.items():
        if not messages or not isinstance(messages[0], dict) or key not in theirs:
            continue
        for one, other in zip(messages, theirs[key], strict=True):
            a = one["properties"].pop("expiration", None)
            b = other["properties"].pop("expiration", None)
            assert (a is None) == (b is None)
            if a is not None:
                assert abs(int(a) - int(b)) < 1000


@pytest.mark.parametrize("case", sorted(CASES))
async def test_same_as_send_task(case: str, broker: tuple[CelerySettings, redis.Redis]) -> None:
    settings, client = broker
    task_id = str(uuid.uuid4())
    delivery = Delivery(**_with_id(CASES[case], task_id))

    app = send_only_app(settings)
    with app.producer_or_acquire() as producer:
        app.send_task(delivery.task_name, producer=producer, **send_options(delivery, NOW))
    app.close()
    theirs = _stored(client, settings.key_prefix)
    client.delete(*client.scan_iter(match=f"{settings.key_prefix}*"))

    publisher = RedisPublisher.from_settings(settings)
    try:
        assert await publisher.publish([delivery]) == [task_id]
    finally:
        await publisher.aclose()
    ours = _stored(client, settings.key_prefix)

    _expiration_close(ours, theirs)
    assert ours == theirs


def _with_id(delivery: Delivery, task_id: str) -> dict[str, Any]:
    return {name: getattr(delivery, name) for name in delivery.__slots__} | {"task_id": task_id}
