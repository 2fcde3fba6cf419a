"""The Celery fleet as the broker sees it: messages per queue, and the workers that answer.

Queue depths (``queue_depths`` picks the adapter for the broker URL):

- Redis: ``LLEN`` of each queue's list and of its priority lists (``<queue>\\x06\\x16<step>``,
  kombu's layout), all in one pipeline. Queues are the ones the caller names plus those kombu
  has a binding set for (``_kombu.binding.<queue>``: every queue a worker or a producer declared).
- RabbitMQ: a passive ``queue.declare`` per queue the caller names, and the default queue
  (``service.broker.amqp_fleet``).
- Other brokers: none (ListQueues shows the recorded counts only).

Workers: Celery's remote control (``inspect().active()``, ``stats()``, ``active_queues()``,
one broadcast each) on a thread, within ``timeout`` seconds. The answer is cached for
``cache_for`` seconds and concurrent askers share the one broadcast in flight: many callers
of ListWorkers cost one broadcast per ``cache_for``. No worker answering is an empty list.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError

from service.broker.amqp import AMQP_SCHEMES
from service.broker.amqp_fleet import AmqpQueueDepths
from service.broker.redis_message import DEFAULT_QUEUE
from service.domain.errors import BrokerUnavailable
from taskgate.worker.contract import KOMBU_BINDING_PREFIX, CelerySettings, common_conf

#: Queues discovered per SCAN of the binding sets at most.
MAX_QUEUES = 1000


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker that answered the broadcast."""

    hostname: str
    queues: tuple[str, ...]
    active_task_ids: tuple[str, ...]
    processed: int
    concurrency: int
    seen_time: dt.datetime


@contextlib.contextmanager
def _broker_errors() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}: {exc}") from exc


class QueueDepths(Protocol):
    """Messages waiting per queue in the broker."""

    async def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Messages per queue, for ``queues`` at least (a queue the broker lacks reads 0).

        Raises:
            BrokerUnavailable: the broker is unreachable.
        """
        ...

    async def aclose(self) -> None:
        """Release the broker connection."""
        ...


def queue_depths(settings: CelerySettings) -> QueueDepths | None:
    """The depths of ``settings.broker_url``'s queues; None for a broker other than Redis
    or RabbitMQ."""
    if settings.broker_url.startswith(AMQP_SCHEMES):
        return AmqpQueueDepths(settings.broker_url)
    return RedisQueueDepths.from_settings(settings)


class RedisQueueDepths:
    """Messages waiting per queue in a Redis broker."""

    def __init__(self, client: aioredis.Redis, prefix: str, steps: Sequence[int], sep: str) -> None:
        self._client = client
        self._prefix = prefix
        self._steps = [step for step in steps if step]
        self._sep = sep

    @classmethod
    def from_settings(cls, settings: CelerySettings) -> RedisQueueDepths | None:
        """Depths of ``settings.broker_url``'s queues; None when the broker is not Redis."""
        if not settings.broker_url.startswith(("redis://", "rediss://")):
            return None
        options = common_conf(settings)["broker_transport_options"]
        client = aioredis.Redis.from_url(
            settings.broker_url,
            socket_timeout=5,
            socket_connect_timeout=3,
            client_name=f"taskgate-{os.getpid()}-queues",
        )
        steps = options.get("priority_steps", (0, 3, 6, 9))
        return cls(client, options.get("global_keyprefix", ""), steps, options.get("sep", "\x06\x16"))

    async def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Messages per queue, for ``queues`` and every queue the broker has a binding for.

        Raises:
            BrokerUnavailable: Redis is unreachable.
        """
        with _broker_errors():
            names = sorted({*queues, *await self._declared()})
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    for key in self._keys(name):
                        pipe.llen(key)
                lengths = iter(await pipe.execute())
        return {name: sum(int(next(lengths)) for _ in self._keys(name)) for name in names}

    def _keys(self, queue: str) -> list[str]:
        plain = f"{self._prefix}{queue}"
        return [plain] + [f"{plain}{self._sep}{step}" for step in self._steps]

    async def _declared(self) -> set[str]:
        binding = f"{self._prefix}{KOMBU_BINDING_PREFIX}"
        found: set[str] = set()
        async for key in self._client.scan_iter(match=f"{binding}*", count=1000):
            text = key.decode() if isinstance(key, bytes) else str(key)
            found.add(text.removeprefix(binding))
            if len(found) >= MAX_QUEUES:
                break
        return found

    async def aclose(self) -> None:
        """Release the connection."""
        await self._client.aclose()


def _workers(
    active: Mapping[str, Any], stats: Mapping[str, Any], queues: Mapping[str, Any]
) -> list[WorkerSnapshot]:
    now = dt.datetime.now(dt.UTC)
    snapshots = []
    for hostname in sorted({*active, *stats, *queues}):
        info = stats.get(hostname) or {}
        totals = info.get("total") or {}
        pool = info.get("pool") or {}
        concurrency = pool.get("max-concurrency", 0) if isinstance(pool, Mapping) else 0
        snapshots.append(
            WorkerSnapshot(
                hostname=hostname,
                queues=tuple(sorted(str(q.get("name", "")) for q in queues.get(hostname) or ())),
                active_task_ids=tuple(str(t.get("id", "")) for t in active.get(hostname) or ()),
                processed=sum(int(n) for n in totals.values()) if isinstance(totals, Mapping) else 0,
                concurrency=int(concurrency) if isinstance(concurrency, int) else 0,
                seen_time=now,
            )
        )
    return snapshots


class WorkerInspector:
    """The workers that answer Celery's remote control, cached (see the module docstring)."""

    def __init__(self, app: Celery, *, timeout: float = 1.0, cache_for: float = 2.0) -> None:
        self._app = app
        self._timeout = timeout
        self._cache_for = cache_for
        self._cached: list[WorkerSnapshot] = []
        self._cached_at = -float("inf")
        self._inflight: asyncio.Task[list[WorkerSnapshot]] | None = None

    async def workers(self) -> list[WorkerSnapshot]:
        """The workers answering now (or within the last ``cache_for`` seconds).

        Raises:
            BrokerUnavailable: the broker is unreachable.
        """
        if time.monotonic() - self._cached_at < self._cache_for:
            return self._cached
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self._broadcast))
        snapshots = await asyncio.shield(self._inflight)
        self._cached, self._cached_at = snapshots, time.monotonic()
        return snapshots

    def _broadcast(self) -> list[WorkerSnapshot]:
        inspect = self._app.control.inspect(timeout=self._timeout)
        try:
            active = inspect.active() or {}
            stats = inspect.stats() or {}
            queues = inspect.active_queues() or {}
        except (OSError, ConnectionError) as exc:
            raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}: {exc}") from exc
        return _workers(active, stats, queues)

    async def aclose(self) -> None:
        """Release the broker connections (on a thread: kombu closes synchronously)."""
        await asyncio.to_thread(self._app.close)


__all__ = [
    "DEFAULT_QUEUE",
    "QueueDepths",
    "RedisQueueDepths",
    "WorkerInspector",
    "WorkerSnapshot",
    "queue_depths",
]
