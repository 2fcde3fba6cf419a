"""Which task ids a Redis broker holds: waiting in a queue, or taken by a worker and not acked.

The recovery pass asks it before republishing a task the database says was published long
ago and no worker has reported on: if the broker still holds the message (in the queue's
list, one of its priority lists, or kombu's ``unacked`` hash, where a worker's prefetched
and ETA messages wait), the task is merely waiting; if not (Redis restarted empty, a flushed
queue), it is lost.

Layout (kombu 5.x ``kombu.transport.redis``, every key with the ``global_keyprefix``)::

    <p><queue>                the queue's list (messages LPUSHed, taken with BRPOP)
    <p><queue>\\x06\\x16<n>     the list of priority step n (n > 0)
    <p>unacked                hash: delivery_tag -> JSON [message, exchange, routing_key]

A message is the JSON document kombu stores (``redis_message.build_message``): the task id
is ``headers.id`` (protocol 2), else ``properties.correlation_id``.

The reading is bounded: at most ``budget`` messages per question, ``chunk`` per round trip,
each chunk decoded off the event loop. A broker holding more than the budget answers
"unknown" (None), and the caller republishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.broker.redis_message import RedisLayout
from service.domain.errors import BrokerUnavailable
from service.runtime.redis_pool import small_pool
from taskgate.worker.contract import CelerySettings, common_conf

log = logging.getLogger(__name__)

#: kombu's Redis transport: the hash of messages taken by a consumer and not acked yet.
UNACKED_KEY = "unacked"
#: Messages read per round trip.
CHUNK = 1000
#: Messages read at most to answer one question.
BUDGET = 200_000


def task_id_of(raw: bytes | str) -> str | None:
    """The task id in one stored message (a queue list's item, or an ``unacked`` hash
    value ``[message, exchange, routing_key]``); None when it names none."""
    try:
        document: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, list) and document:
        document = document[0]
    if not isinstance(document, dict):
        return None
    headers = document.get("headers")
    if isinstance(headers, dict) and isinstance(headers.get("id"), str):
        return str(headers["id"])
    properties = document.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get("correlation_id"), str):
        return str(properties["correlation_id"])
    return None


def task_ids_of(raws: Iterable[bytes | str]) -> set[str]:
    """The task ids of several stored messages (see ``task_id_of``)."""
    return {task_id for raw in raws if (task_id := task_id_of(raw)) is not None}


@contextlib.contextmanager
def _broker_errors() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}: {exc}") from exc


class BudgetExceeded(Exception):
    """The broker holds more messages than one question may read."""


class BrokerInspector:
    """Reads which task ids a Redis broker holds (see the module docstring)."""

    def __init__(
        self, client: aioredis.Redis, layout: RedisLayout, *, chunk: int = CHUNK, budget: int = BUDGET
    ) -> None:
        self._client = client
        self._layout = layout
        self._chunk = chunk
        self._budget = budget

    @classmethod
    def from_settings(cls, settings: CelerySettings) -> BrokerInspector | None:
        """An inspector of ``settings.broker_url``; None when the broker is not Redis."""
        if not settings.broker_url.startswith(("redis://", "rediss://")):
            return None
        options = common_conf(settings)["broker_transport_options"]
        layout = RedisLayout(
            key_prefix=options.get("global_keyprefix", ""),
            priority_steps=options.get("priority_steps", (0, 3, 6, 9)),
            sep=options.get("sep", "\x06\x16"),
        )
        return cls(small_pool(settings.broker_url, "inspect", size=1, socket_timeout=10), layout)

    def list_keys(self, queue: str) -> list[str]:
        """The Redis lists of ``queue``: the plain one and one per priority step above 0."""
        layout = self._layout
        names = [queue] + [f"{queue}{layout.sep}{step}" for step in layout.priority_steps if step]
        return [f"{layout.key_prefix}{name}" for name in names]

    async def held(self, queues: Iterable[str], wanted: Collection[str]) -> set[str] | None:
        """Those of ``wanted`` whose message the broker holds, in ``queues`` (empty: the
        default queue) or in the unacked hash; None when that takes more than the budget.

        Raises:
            BrokerUnavailable: Redis is unreachable.
        """
        todo = set(wanted)
        found: set[str] = set()
        read = 0
        names = sorted({queue or self._layout.default_queue for queue in queues})
        try:
            with _broker_errors():
                for key in [key for name in names for key in self.list_keys(name)]:
                    async for chunk in self._list_chunks(key):
                        read += await self._take(chunk, todo, found, read)
                        if not todo:
                            return found
                async for chunk in self._unacked_chunks():
                    read += await self._take(chunk, todo, found, read)
                    if not todo:
                        return found
        except BudgetExceeded:
            log.warning(
                "broker inspection: more than %d messages held; nothing decided this pass", self._budget
            )
            return None
        return found

    async def _take(self, chunk: list[bytes | str], todo: set[str], found: set[str], read: int) -> int:
        """Move the ids of ``chunk`` found in ``todo`` to ``found``; returns the chunk's size."""
        if read + len(chunk) > self._budget:
            raise BudgetExceeded
        ids = await asyncio.to_thread(task_ids_of, chunk) if chunk else set()
        hits = ids & todo
        found |= hits
        todo -= hits
        return len(chunk)

    async def _list_chunks(self, key: str) -> AsyncIterator[list[bytes | str]]:
        """The list's items, ``chunk`` at a time from its tail (the oldest first)."""
        length = int(await self._client.llen(key))
        for end in range(length, 0, -self._chunk):
            items = await self._client.lrange(key, max(end - self._chunk, 0), end - 1)
            yield list(items)

    async def _unacked_chunks(self) -> AsyncIterator[list[bytes | str]]:
        """The unacked hash's values, about ``chunk`` at a time."""
        key = f"{self._layout.key_prefix}{UNACKED_KEY}"
        cursor = 0
        while True:
            cursor, entries = await self._client.hscan(key, cursor, count=self._chunk)
            yield list(entries.values()) if isinstance(entries, dict) else []
            if cursor == 0:
                return

    async def aclose(self) -> None:
        """Release the connection."""
        await self._client.aclose(close_connection_pool=True)
