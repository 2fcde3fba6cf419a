"""Asking the live workers (service.broker.inspect.BrokerInspector.answers): kombu's errors
become BrokerUnavailable, and a broadcast stuck in kombu's retries is bounded and abandoned."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis.asyncio as aioredis
from kombu.exceptions import OperationalError

from service.broker import inspect
from service.broker.inspect import BrokerInspector
from service.broker.redis_message import RedisLayout
from service.domain.errors import BrokerUnavailable
from tests.conftest import REDIS_URL


class FakeApp:
    """A Celery app whose ``control.inspect(...).query_task`` runs ``reply``."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.closed = False
        self.control = self

    def inspect(self, timeout: float) -> FakeApp:
        return self

    def query_task(self, *task_ids: str) -> Any:
        return self.reply(task_ids)

    def close(self) -> None:
        self.closed = True


def inspector(app: FakeApp) -> BrokerInspector:
    fake: Any = app
    return BrokerInspector(aioredis.Redis.from_url(REDIS_URL), RedisLayout(), app=fake)


async def test_answers_by_node() -> None:
    app = FakeApp(lambda ids: {"celery@a": {ids[0]: ["active", {}]}, "celery@b": {}})
    inspecting = inspector(app)
    try:
        assert await inspecting.answers({"t1"}) == {"celery@a": {"t1"}, "celery@b": set()}
    finally:
        await inspecting.aclose()
    assert app.closed


async def test_kombus_operational_error_is_broker_unavailable() -> None:
    def refuse(ids: Any) -> Any:
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    inspecting = inspector(FakeApp(refuse))
    try:
        with pytest.raises(BrokerUnavailable, match="OperationalError"):
            await inspecting.answers({"t1"})
    finally:
        await inspecting.aclose()


async def test_a_stuck_broadcast_is_bounded_refused_again_and_abandoned_on_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kombu retries a pidbox publish without limit: the call is cut at QUERY_TIMEOUT, the
    next question is refused while the thread is still stuck, and closing does not wait."""
    monkeypatch.setattr(inspect, "QUERY_TIMEOUT", 0.05)
    release = threading.Event()
    calls = []

    def stuck(ids: Any) -> Any:
        calls.append(ids)
        release.wait(30)
        return {}

    app = FakeApp(stuck)
    inspecting = inspector(app)
    try:
        with pytest.raises(BrokerUnavailable, match="query_task took over"):
            await inspecting.answers({"t1"})
        with pytest.raises(BrokerUnavailable, match="still stuck"):
            await inspecting.answers({"t2"})
        assert len(calls) == 1  # nothing queued behind the stuck broadcast
        await inspecting.aclose()  # returns although the broadcast is still stuck
        assert not app.closed  # its connection is not closed under the stuck thread
    finally:
        release.set()
