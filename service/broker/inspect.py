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

**Prefetched messages of a dead worker.** The unacked hash does not say which consumer took
a message; ``<p>unacked_index`` (a sorted set: delivery_tag -> when it was taken) says when.
``taken`` reads the entries taken before a time; ``holders`` asks the live workers (Celery's
``query_task`` broadcast, one per question) which of those tasks they hold (reserved,
scheduled or active; ``answers`` says it per worker, naming those that hold none of them);
``restore`` puts one message back at the head of its queue and removes it from the hash and
the index in one Lua script, only if the entry is still the one read (compare-and-move: a
message acked or restored meanwhile is left alone), setting ``redelivered`` as kombu's
``restore_by_tag`` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from service.broker.publisher import send_only_app
from service.broker.redis_message import RedisLayout
from service.domain.errors import BrokerUnavailable
from service.runtime.redis_pool import small_pool
from taskgate.worker.contract import CelerySettings, common_conf

log = logging.getLogger(__name__)

#: kombu's Redis transport: the hash of messages taken by a consumer and not acked yet.
UNACKED_KEY = "unacked"
#: kombu's Redis transport: sorted set delivery_tag -> time the message was taken.
UNACKED_INDEX_KEY = "unacked_index"
#: Seconds the live workers get to answer ``query_task``.
HOLDERS_TIMEOUT = 1.0
#: Seconds one ``query_task`` broadcast may take in all (connect, publish, collect) before
#: the broker counts as unreachable. kombu's pidbox publishes with ``retry=True`` and no
#: retry limit (no policy can be passed through ``Control.broadcast``), so during an outage
#: the call can block its thread until the broker returns: it runs on the inspector's own
#: thread, bounded here, and the next question is refused while it is still stuck.
QUERY_TIMEOUT = HOLDERS_TIMEOUT + 5
#: What a Celery control call raises when the broker is unreachable (kombu wraps the
#: transport's errors in its ``OperationalError``).
_QUERY_ERRORS = (OperationalError, OSError, ConnectionError, RedisError)
#: Put an unacked message back on its list if its entry is still the one read:
#: KEYS unacked hash, unacked index, list; ARGV tag, entry read, message to push.
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""
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


@dataclass(frozen=True, slots=True)
class Taken:
    """A message a consumer took and has not acked: its delivery tag, the hash entry as
    stored (``[message, exchange, routing_key]``) and when it was taken (epoch seconds)."""

    tag: str
    entry: bytes
    taken_at: float


def redelivery(entry: bytes) -> tuple[bytes, int] | None:
    """The message to push back for an unacked ``entry`` (``redelivered`` set, as kombu's
    restore does) and its priority; None when the entry holds no message."""
    try:
        document: Any = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, list) or not document or not isinstance(document[0], dict):
        return None
    message: dict[str, Any] = document[0]
    headers, properties = message.get("headers"), message.get("properties")
    if isinstance(headers, dict):
        headers["redelivered"] = True
    priority = 0
    if isinstance(properties, dict):
        info = properties.get("delivery_info")
        if isinstance(info, dict):
            info["redelivered"] = True
        with contextlib.suppress(TypeError, ValueError):
            priority = int(properties.get("priority") or 0)
    return orjson.dumps(message), priority


class BudgetExceeded(Exception):
    """The broker holds more messages than one question may read."""


class BrokerInspector:
    """Reads which task ids a Redis broker holds (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: RedisLayout,
        *,
        app: Celery | None = None,
        chunk: int = CHUNK,
        budget: int = BUDGET,
    ) -> None:
        self._client = client
        self._layout = layout
        self._app = app
        self._chunk = chunk
        self._budget = budget
        self._restore = client.register_script(_RESTORE)
        #: the thread ``query_task`` broadcasts run on (never the loop's default executor:
        #: a broadcast stuck in kombu's retries must not hold up shutdown)
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="taskgate-inspect")
        self._asking: concurrent.futures.Future[dict[str, set[str]]] | None = None

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
        client = small_pool(settings.broker_url, "inspect", size=1, socket_timeout=10)
        return cls(client, layout, app=send_only_app(settings))

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

    async def taken(self, wanted: Collection[str], before: float) -> dict[str, Taken] | None:
        """Those of ``wanted`` whose message sits in the unacked hash, taken before
        ``before`` (epoch seconds), by task id; None when that takes more than the budget.

        Raises:
            BrokerUnavailable: Redis is unreachable.
        """
        todo, found = set(wanted), dict[str, Taken]()
        index = f"{self._layout.key_prefix}{UNACKED_INDEX_KEY}"
        unacked = f"{self._layout.key_prefix}{UNACKED_KEY}"
        with _broker_errors():
            for offset in range(0, self._budget, self._chunk):
                rows: list[Any] = await self._client.zrange(
                    index, "-inf", before, byscore=True, offset=offset, num=self._chunk, withscores=True
                )
                if not rows:
                    return found
                tags = [_text(row[0]) for row in rows]
                entries = await self._client.hmget(unacked, tags)
                for tag, row, entry in zip(tags, rows, entries, strict=True):
                    if entry is None:
                        continue
                    raw = entry if isinstance(entry, bytes) else str(entry).encode()
                    task_id = task_id_of(raw)
                    if task_id in todo:
                        todo.discard(task_id)
                        found[task_id] = Taken(tag, raw, float(row[1]))
                if not todo or len(rows) < self._chunk:
                    return found
        log.warning(
            "broker inspection: more than %d messages unacked; nothing decided this pass", self._budget
        )
        return None

    async def holders(self, task_ids: Collection[str]) -> set[str] | None:
        """Those of ``task_ids`` a live worker holds (reserved, scheduled or active), as the
        workers answering Celery's ``query_task`` within ``HOLDERS_TIMEOUT`` say; None when
        this inspector cannot ask (no Celery app).

        Raises:
            BrokerUnavailable: the broker is unreachable.
        """
        answers = await self.answers(task_ids)
        if answers is None:
            return None
        return {task_id for held in answers.values() for task_id in held}

    async def answers(self, task_ids: Collection[str]) -> dict[str, set[str]] | None:
        """What each live worker answering Celery's ``query_task`` within
        ``HOLDERS_TIMEOUT`` holds of ``task_ids`` (reserved, scheduled or active), by node
        name; a worker that answered and holds none of them maps to an empty set. None when
        this inspector cannot ask (no Celery app).

        Raises:
            BrokerUnavailable: the broker is unreachable.
        """
        if self._app is None:
            return None
        if not task_ids:
            return {}
        if self._asking is not None and not self._asking.done():
            raise BrokerUnavailable("broker unreachable: the previous query_task broadcast is still stuck")
        self._asking = self._control.submit(self._query, sorted(task_ids))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._asking), QUERY_TIMEOUT)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"broker unreachable: query_task took over {QUERY_TIMEOUT} s") from exc

    def _query(self, task_ids: list[str]) -> dict[str, set[str]]:
        assert self._app is not None
        try:
            replies = self._app.control.inspect(timeout=HOLDERS_TIMEOUT).query_task(*task_ids) or {}
        except _QUERY_ERRORS as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}: {exc}") from exc
        return {
            str(node): {str(task_id) for task_id in held} if isinstance(held, dict) else set()
            for node, held in replies.items()
        }

    async def restore(self, taken: Taken, queue: str) -> bool:
        """Push ``taken``'s message back at the head of ``queue`` (empty: the default
        queue; its priority list) and drop its unacked entry, atomically and only if the
        entry is unchanged; returns whether it was restored.

        Raises:
            BrokerUnavailable: Redis is unreachable.
        """
        again = redelivery(taken.entry)
        if again is None:
            return False
        message, priority = again
        layout = self._layout
        name = queue or layout.default_queue
        step = layout.priority_step(priority)
        key = f"{layout.key_prefix}{name}{layout.sep}{step}" if step else f"{layout.key_prefix}{name}"
        keys = [f"{layout.key_prefix}{UNACKED_KEY}", f"{layout.key_prefix}{UNACKED_INDEX_KEY}", key]
        with _broker_errors():
            return bool(await self._restore(keys=keys, args=[taken.tag, taken.entry, message]))

    async def aclose(self) -> None:
        """Release the connection (and the Celery app's, on a thread: kombu closes
        synchronously). A broadcast still stuck in kombu's retries is abandoned, not waited
        for (its thread ends when the broker answers or the process exits)."""
        await self._client.aclose(close_connection_pool=True)
        stuck = self._asking is not None and not self._asking.done()
        self._control.shutdown(wait=False, cancel_futures=True)
        if self._app is not None and not stuck:
            await asyncio.to_thread(self._app.close)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
