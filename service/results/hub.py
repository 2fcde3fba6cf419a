"""One shared Redis subscription per process, fanned out to every watcher.

The hub PSUBSCRIBEs once to ``<prefix>celery-task-meta-*`` (the channels the result backend
publishes every state on). Each message is decoded once and handed to the recorder (so
every state reaches the database, watched or not) and to the inboxes of the streams that
watch that task. A stream costs an inbox (a few hundred bytes), not a Redis connection nor
a timer; a workflow's stream has one inbox for all its steps (``register_many``). When the
subscription is lost each inbox gets ``PAUSED`` (its stream polls the task until it is
back); after every (re)subscribe each gets ``RESYNC`` so its stream re-reads the task:
anything published while the subscription was down is not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.domain.errors import ResultBackendUnavailable
from service.domain.model import TaskUpdate
from service.results.document import parse_payload
from taskgate.worker.contract import meta_pattern

log = logging.getLogger(__name__)

#: Messages handled between two yields to the event loop.
YIELD_EVERY = 32

#: Largest inbox of a stream watching many tasks (``register_many``).
MANY_INBOX_MAX = 4096

#: Redis CLIENT SETNAME prefix of the hub's connections (visible in CLIENT LIST).
CLIENT_NAME = "taskgate-hub"


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn redis-py's connection failures into the domain's ``ResultBackendUnavailable``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise ResultBackendUnavailable(f"result backend unreachable: {type(exc).__name__}: {exc}") from exc


class Signal(enum.Enum):
    """Inbox items that are not updates."""

    RESYNC = "resync"  # the subscription was (re)established: re-read the task
    PAUSED = "paused"  # the subscription is lost: poll the task until the next RESYNC
    SHUTDOWN = "shutdown"  # the server is stopping: end the stream
    EXPIRED = "expired"  # the stream's lifetime is over: end it


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Inbox:
    """A stream's mailbox. Bounded: when full the oldest update goes (every update carries
    the whole state, so the newest is all a slow reader needs); signals are kept.

    Kept small, as there is one per open stream: a list, and a future only while the
    stream waits (woken by ``put`` or by a timer, never by cancelling anything).
    """

    __slots__ = ("_items", "_keys", "_size", "_waiter")

    def __init__(self, size: int = 32) -> None:
        self._items: list[TaskUpdate | Signal] = []
        self._size = size
        self._waiter: asyncio.Future[None] | None = None
        #: how many task ids it is registered under (the hub's accounting)
        self._keys = 0

    def put(self, item: TaskUpdate | Signal) -> None:
        """Add an item; never blocks."""
        items = self._items
        if len(items) >= self._size:
            oldest = next((i for i, old in enumerate(items) if not isinstance(old, Signal)), 0)
            del items[oldest]
        items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drain(self) -> list[TaskUpdate | Signal]:
        """Every item waiting, oldest first (never waits)."""
        items, self._items = self._items, []
        return items

    async def get(self, timeout: float | None) -> TaskUpdate | Signal | None:
        """The next item, or None after ``timeout`` seconds without one (None: no time limit)."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
            if not self._items:
                return None
        return self._items.pop(0)


class ProgressHub:
    """The process's subscription to task updates, and its Redis client for snapshots."""

    def __init__(
        self,
        redis_url: str,
        meta_prefix: str,
        on_update: Callable[[TaskUpdate], None],
        *,
        max_connections: int = 4,
    ) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=5,
            client_name=f"{CLIENT_NAME}-{os.getpid()}-reads",
        )
        self._client = aioredis.Redis.from_pool(pool)
        self._subscriber = aioredis.Redis.from_url(
            redis_url,
            socket_keepalive=True,
            health_check_interval=15,
            client_name=f"{CLIENT_NAME}-{os.getpid()}-sub",
        )
        self._prefix = meta_prefix
        self._on_update = on_update
        self._on_resubscribe: list[Callable[[], None]] = []
        #: the inboxes of each watched task (a list: nearly always one)
        self._inboxes: dict[str, list[Inbox]] = {}
        self._inbox_count = 0
        self._ready = asyncio.Event()
        self._closing = False

    @property
    def ready(self) -> bool:
        """True while the subscription is established."""
        return self._ready.is_set()

    @property
    def watcher_count(self) -> int:
        """How many inboxes are registered (for tests and metrics)."""
        return self._inbox_count

    def on_resubscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every (re)subscribe."""
        self._on_resubscribe.append(callback)

    async def listen(self) -> None:
        """One subscription session: returns or raises when it ends (run it supervised).

        Raises:
            ResultBackendUnavailable: Redis is unreachable or the connection dropped.
        """
        with redis_errors():
            await self._listen()

    async def _listen(self) -> None:
        pubsub = self._subscriber.pubsub()
        try:
            await pubsub.psubscribe(meta_pattern(self._prefix))
            handled = 0
            async for message in pubsub.listen():
                kind = message.get("type")
                if kind == "psubscribe":
                    self._subscribed()
                elif kind == "pmessage":
                    try:
                        self._dispatch(message["channel"], message["data"])
                    except Exception:  # one bad document must not cost every stream its updates
                        log.exception("update on %r not handled; skipped", message["channel"])
                    handled += 1
                    if handled % YIELD_EVERY == 0:
                        # buffered messages are read without suspending: let the streams
                        # (and every other callback) run between slices of a burst
                        await asyncio.sleep(0)
        finally:
            if self._ready.is_set():
                self._ready.clear()
                self._broadcast(Signal.PAUSED)
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _broadcast(self, signal: Signal) -> None:
        seen: set[Inbox] = set()  # an inbox of several tasks gets the signal once
        for boxes in self._inboxes.values():
            for inbox in boxes:
                if inbox._keys == 1:
                    inbox.put(signal)
                elif inbox not in seen:
                    seen.add(inbox)
                    inbox.put(signal)

    def _subscribed(self) -> None:
        self._ready.set()
        log.info("progress subscription up (%d watchers)", self.watcher_count)
        self._broadcast(Signal.RESYNC)
        for callback in self._on_resubscribe:
            callback()

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        task_id = name[len(self._prefix) :]
        update = parse_payload(task_id, data, dt.datetime.now(dt.UTC))
        if update is None:
            return
        self._on_update(update)
        self.deliver(update)

    def deliver(self, update: TaskUpdate) -> None:
        """Hand ``update`` to the inboxes of the streams watching its task (nothing else: it is
        not recorded again). For updates that reach the gateway another way (the state feed)."""
        for inbox in self._inboxes.get(update.task_id, ()):
            inbox.put(update)

    def register(self, task_id: str) -> Inbox:
        """A new inbox that receives ``task_id``'s updates until ``unregister``-ed."""
        inbox = Inbox()
        if self._closing:
            inbox.put(Signal.SHUTDOWN)
        self._add(task_id, inbox)
        return inbox

    def register_many(self, task_ids: Iterable[str]) -> Inbox:
        """One new inbox that receives the updates of every task in ``task_ids`` (a workflow's
        steps) until ``unregister_many``-ed; it counts as one watcher and gets each signal once.
        Its size fits a burst of one update per task."""
        unique = list(dict.fromkeys(task_ids))
        inbox = Inbox(size=min(max(len(unique) + 8, 32), MANY_INBOX_MAX))
        if self._closing:
            inbox.put(Signal.SHUTDOWN)
        for task_id in unique:
            self._add(task_id, inbox)
        return inbox

    def _add(self, task_id: str, inbox: Inbox) -> None:
        boxes = self._inboxes.get(task_id)
        if boxes is None:
            self._inboxes[task_id] = [inbox]
        elif inbox in boxes:
            return
        else:
            boxes.append(inbox)
        inbox._keys += 1
        if inbox._keys == 1:
            self._inbox_count += 1

    def unregister(self, task_id: str, inbox: Inbox) -> None:
        """Stop delivering ``task_id``'s updates to ``inbox`` (a no-op when it is not registered)."""
        boxes = self._inboxes.get(task_id)
        if boxes is not None and inbox in boxes:
            boxes.remove(inbox)
            inbox._keys -= 1
            if inbox._keys == 0:
                self._inbox_count -= 1
            if not boxes:
                del self._inboxes[task_id]

    def unregister_many(self, task_ids: Iterable[str], inbox: Inbox) -> None:
        """Stop delivering to ``inbox`` the updates of every task in ``task_ids``."""
        for task_id in task_ids:
            self.unregister(task_id, inbox)

    async def snapshot(self, task_id: str) -> TaskUpdate | None:
        """The latest stored state of ``task_id`` in Redis, or None if it has no key.

        Raises:
            ResultBackendUnavailable: Redis is unreachable.
        """
        with redis_errors():
            payload = await self._client.get(f"{self._prefix}{task_id}")
        if payload is None:
            return None
        return parse_payload(task_id, payload, dt.datetime.now(dt.UTC))

    async def snapshots(self, task_ids: Sequence[str]) -> list[TaskUpdate]:
        """The latest stored states of several tasks (one MGET); missing keys are skipped."""
        if not task_ids:
            return []
        with redis_errors():
            payloads = await self._client.mget([f"{self._prefix}{task_id}" for task_id in task_ids])
        now = dt.datetime.now(dt.UTC)
        updates = []
        for task_id, payload in zip(task_ids, payloads, strict=True):
            if payload is not None and (update := parse_payload(task_id, payload, now)) is not None:
                updates.append(update)
        return updates

    async def ping(self) -> None:
        """Raise :class:`ResultBackendUnavailable` unless Redis answers."""
        with redis_errors():
            await self._client.ping()

    def begin_shutdown(self) -> None:
        """End every stream (they answer UNAVAILABLE so callers reconnect elsewhere)."""
        self._closing = True
        self._broadcast(Signal.SHUTDOWN)

    async def close(self) -> None:
        """Release the Redis connections."""
        await self._client.aclose()
        await self._subscriber.aclose()
