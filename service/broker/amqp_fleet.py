"""Queue depths on RabbitMQ: a passive ``queue.declare`` per queue, on one connection.

RabbitMQ answers a passive declaration with the queue's ``message_count`` (the messages
ready for delivery, every priority included; not those a worker holds unacknowledged — as
on Redis, where a taken message leaves the list). AMQP has no way to list a vhost's
queues (that is the management plugin's HTTP API), so the queues asked about are the ones
the caller names plus the default queue; a queue that does not exist reads 0, as ``LLEN``
of a missing list does on Redis.

A passive declaration of a missing queue makes RabbitMQ close the channel (404): the next
probe opens a new channel on the same connection. The connection stays open between calls
and is opened again after an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from service.broker.amqp import amqp_url
from service.broker.redis_message import DEFAULT_QUEUE
from service.domain.errors import BrokerUnavailable

_ERRORS = (aiormq.exceptions.AMQPError, OSError, ConnectionError, TimeoutError)


class AmqpQueueDepths:
    """Messages ready per queue on RabbitMQ."""

    def __init__(self, url: str, *, connect_timeout: float = 3.0, timeout: float = 5.0) -> None:
        self._url = amqp_url(url)
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Messages ready in each of ``queues`` and the default queue (0 for a missing one).

        Raises:
            BrokerUnavailable: RabbitMQ is unreachable or does not answer in time.
        """
        names = sorted({*queues, DEFAULT_QUEUE})
        async with self._lock:
            try:
                async with asyncio.timeout(self._connect_timeout + self._timeout):
                    return {name: await self._depth(name) for name in names}
            except _ERRORS as exc:
                await self._reset()
                raise BrokerUnavailable(f"broker unreachable: {type(exc).__name__}: {exc}") from exc

    async def _depth(self, name: str) -> int:
        channel = await self._open()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._channel = None  # RabbitMQ closed it; the next probe opens another
            return 0
        return int(queue.declaration_result.message_count or 0)

    async def _open(self) -> AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            await self._reset()
            self._connection = await aio_pika.connect(self._url, timeout=self._connect_timeout)
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=False)
        return self._channel

    async def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*_ERRORS):  # closing a link that is already dead
                await asyncio.wait_for(connection.close(), 3)

    async def aclose(self) -> None:
        """Close the connection."""
        async with self._lock:
            await self._reset()


__all__ = ["AmqpQueueDepths"]
