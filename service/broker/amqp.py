"""Publishing Celery messages to RabbitMQ (AMQP 0-9-1) with publisher confirms.

``AmqpPublisher`` sends the message Celery's ``send_task`` sends over kombu's AMQP
transport — protocol v2, JSON body, the same headers (an AMQP table), the same properties
(``content_type``, ``content_encoding``, ``correlation_id``, ``reply_to``, ``priority``,
``delivery_mode=2``; not the ``expiration`` TTL, see ``build_amqp``) — on the default
exchange with the queue's name as routing key, as Celery converts a direct-exchange route. Queues are declared
the way a Celery worker declares them (a durable direct exchange named like the queue, a
durable queue bound to it, ``x-max-priority`` when ``task_queue_max_priority`` is set):
RabbitMQ refuses a second declaration with other arguments, so the gateway's
``TASKGATE_QUEUE_MAX_PRIORITY`` must equal the workers' ``task_queue_max_priority``.

A batch goes out on one channel in confirm mode without waiting between messages; the
publisher then waits for the broker's confirms and reports the acknowledged prefix. The
outbox marks a row published only for those ids, so an accepted task survives a broker
that is down, restarts or drops the connection mid-batch (the relay publishes the rest
again; a worker skips a second delivery of an id that did arrive).

It runs on the event loop with aio-pika (connections and declarations) and the aiormq
channel beneath it. The publishes themselves bypass pamqp's reflective encoder (about
115 µs per message): ``amqp_frames`` writes the same bytes by hand, and the Celery headers
table — the same keys in every message, most values fixed — is encoded once per origin
(``TableTemplate``), only the task id, name, reprs, ETA, expiry and limits per message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any, cast

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection

from service.broker.amqp_frames import (
    FramePublisher,
    MessageProperties,
    Outgoing,
    TableTemplate,
    encode_table,
)
from service.broker.redis_message import _EMBED, DEFAULT_QUEUE, _repr
from service.domain.errors import BrokerUnavailable
from service.domain.model import Delivery

log = logging.getLogger(__name__)

#: URL schemes this publisher speaks (kombu's names for RabbitMQ).
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
#: Deliveries encoded between two awaits: bounds how long the event loop is held.
ENCODE_CHUNK = 200
#: RabbitMQ's reply code when a queue exists with other arguments.
PRECONDITION_FAILED = 406

_ERRORS = (aiormq.exceptions.AMQPError, OSError, ConnectionError, TimeoutError)


def amqp_url(url: str) -> str:
    """``url`` as aio-pika takes it (kombu's ``pyamqp://`` is plain ``amqp://``)."""
    return "amqp://" + url.removeprefix("pyamqp://") if url.startswith("pyamqp://") else url


#: The protocol-v2 headers that are the same in every message ``send_task`` writes.
FIXED_HEADERS: dict[str, Any] = {
    "lang": "py",
    "shadow": None,
    "group": None,
    "group_index": None,
    "retries": 0,
    "parent_id": None,
    "ignore_result": None,
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}
#: The headers that vary, in the order ``_variable_values`` gives them (sorted, as encoded).
VARIABLE_HEADERS = ("argsrepr", "eta", "expires", "id", "kwargsrepr", "root_id", "task", "timelimit")


def _variable_values(delivery: Delivery, now: dt.datetime) -> tuple[Any, ...]:
    return (
        _repr(delivery.args) if delivery.args else "()",
        delivery.run_time.isoformat() if delivery.run_time > now else None,
        delivery.expire_time.isoformat() if delivery.expire_time is not None else None,
        delivery.task_id,
        _repr(delivery.kwargs),
        delivery.task_id,
        delivery.task_name,
        [delivery.time_limit, delivery.soft_time_limit],
    )


def task_headers(delivery: Delivery, origin: str, now: dt.datetime) -> dict[str, Any]:
    """The protocol-v2 headers ``send_task`` writes (``celery.app.amqp.as_task_v2``)."""
    headers = {**FIXED_HEADERS, "origin": origin}
    headers.update(zip(VARIABLE_HEADERS, _variable_values(delivery, now), strict=True))
    if delivery.headers:
        headers.update(delivery.headers)
    if delivery.trace_headers:
        headers.update(delivery.trace_headers)
    return headers


@functools.lru_cache(maxsize=8)
def _headers_template(origin: str) -> TableTemplate:
    """``task_headers`` without extra headers, encoded once per origin (one per process)."""
    template = TableTemplate(VARIABLE_HEADERS, {**FIXED_HEADERS, "origin": origin})
    assert template.variable == VARIABLE_HEADERS
    return template


def encoded_headers(delivery: Delivery, origin: str, now: dt.datetime) -> bytes:
    """``task_headers`` as an AMQP field table: the same bytes as encoding the dict, and
    through a template (only the varying values encoded) when the delivery adds no headers."""
    if delivery.headers or delivery.trace_headers:
        return encode_table(task_headers(delivery, origin, now))
    return _headers_template(origin).encode(_variable_values(delivery, now))


def build_amqp(
    delivery: Delivery, *, origin: str, reply_to: str, now: dt.datetime
) -> tuple[bytes, MessageProperties]:
    """The body and properties kombu's AMQP transport sends for ``delivery``; a delivery
    carrying Celery's own ``message`` (a workflow step) keeps its headers and body.

    Unlike ``send_task``, no ``expiration`` property (a per-message TTL): RabbitMQ would
    drop an expired message unseen and the task would stay QUEUED for ever. Without it a
    worker takes the message, sees the ``expires`` header and records the task REVOKED
    (CANCELLED), as on Redis, whose transport has no TTL at all.
    """
    headers: dict[str, Any] | bytes
    if delivery.message is not None:
        raw = delivery.message["body"]
        body = raw if isinstance(raw, bytes) else orjson.dumps(raw)
        headers = {**delivery.message["headers"], "origin": origin}
    else:
        body = orjson.dumps([delivery.args, delivery.kwargs, _EMBED])
        headers = encoded_headers(delivery, origin, now)
    properties = MessageProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=delivery.priority or 0,
        correlation_id=delivery.task_id,
        reply_to=reply_to,
    )
    return body, properties


class AmqpPublisher:
    """Publishes batches to RabbitMQ on one channel with publisher confirms."""

    def __init__(
        self,
        url: str,
        *,
        max_priority: int | None = None,
        default_queue: str = DEFAULT_QUEUE,
        connect_timeout: float = 3.0,
        confirm_timeout: float = 10.0,
    ) -> None:
        self._url = amqp_url(url)
        self._max_priority = max_priority
        self._default_queue = default_queue
        self._connect_timeout = connect_timeout
        self._confirm_timeout = confirm_timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._frames: FramePublisher | None = None
        self._declared: set[str] = set()
        self._lock = asyncio.Lock()
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())

    def queue_arguments(self) -> dict[str, Any] | None:
        """The arguments every queue is declared with (as Celery's ``Queues`` adds them)."""
        return {"x-max-priority": self._max_priority} if self._max_priority is not None else None

    async def publish(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Publish in order and wait for the confirms; return the acknowledged prefix.

        Raises:
            BrokerUnavailable: RabbitMQ is unreachable, refused the queue declaration, or
                confirmed none of the batch.
        """
        if not deliveries:
            return []
        async with self._lock:
            try:
                # one deadline over everything: a connection that stops answering mid-open,
                # mid-declare or mid-write must not hold the outbox (and this lock) for ever
                async with asyncio.timeout(self._connect_timeout + self._confirm_timeout):
                    frames = await self._open()
                    await self._declare({delivery.queue or self._default_queue for delivery in deliveries})
                    acked = await self._send(frames, deliveries)
            except _ERRORS as exc:
                await self._reset()
                log.warning("broker unreachable, %d task(s) left in the outbox: %r", len(deliveries), exc)
                raise BrokerUnavailable("the broker is unreachable") from exc
        done: list[str] = []
        for delivery, ok in zip(deliveries, acked, strict=True):
            if not ok:
                break
            done.append(delivery.task_id)
        if len(done) < len(deliveries):
            await self._reset()  # a channel that failed a confirm is not trusted again
        if not done:
            log.warning(
                "broker confirmed none of %d task(s) (nack, return or closed channel)", len(deliveries)
            )
            raise BrokerUnavailable("the broker did not confirm the tasks")
        if len(done) < len(deliveries):
            log.warning(
                "broker confirmed %d of %d task(s); the rest stay in the outbox", len(done), len(deliveries)
            )
        return done

    async def _send(self, frames: FramePublisher, deliveries: Sequence[Delivery]) -> list[bool]:
        """Write every message (one buffer per chunk) and wait for the confirms: per message,
        whether RabbitMQ acknowledged it."""
        now = dt.datetime.now(dt.UTC)
        messages: list[Outgoing] = []
        for start in range(0, len(deliveries), ENCODE_CHUNK):
            if start:
                await asyncio.sleep(0)  # let other callbacks run between chunks
            for delivery in deliveries[start : start + ENCODE_CHUNK]:
                body, properties = build_amqp(delivery, origin=self._origin, reply_to=self._reply_to, now=now)
                messages.append((delivery.queue or self._default_queue, body, properties))
        return await frames.publish(messages)

    async def _open(self) -> FramePublisher:
        if self._frames is not None and self._channel is not None and not self._channel.is_closed:
            return self._frames
        await self._reset()
        connection = await aio_pika.connect(self._url, timeout=self._connect_timeout)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            raw = cast(aiormq.Channel, await channel.get_underlay_channel())
            self._frames = FramePublisher(raw, id_prefix=f"{uuid.uuid4().hex[:12]}.")
        except BaseException:
            await connection.close()
            raise
        self._connection, self._channel = connection, channel
        return self._frames

    async def _declare(self, queues: set[str]) -> None:
        """Declare, once per connection, each queue as a Celery worker would."""
        channel = self._channel
        assert channel is not None
        for name in sorted(queues - self._declared):
            try:
                exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
                queue = await channel.declare_queue(name, durable=True, arguments=self.queue_arguments())
                await queue.bind(exchange, routing_key=name)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                log.error(
                    "queue %r exists with other arguments than %r: set TASKGATE_QUEUE_MAX_PRIORITY "
                    "to the workers' task_queue_max_priority (%s)",
                    name,
                    self.queue_arguments(),
                    exc,
                )
                raise
            self._declared.add(name)

    async def _reset(self) -> None:
        """Drop the connection (a new one is opened by the next publish)."""
        connection, self._connection, self._channel, self._frames = self._connection, None, None, None
        self._declared.clear()
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), 3)
            except _ERRORS:  # closing a link that is already dead
                log.debug("closing the broker connection failed", exc_info=True)

    async def aping(self) -> None:
        """Raise BrokerUnavailable unless RabbitMQ accepts a connection (or has one open)."""
        async with self._lock:
            try:
                await self._open()
            except _ERRORS as exc:
                await self._reset()
                raise BrokerUnavailable("the broker is unreachable") from exc

    async def aclose(self) -> None:
        """Close the connection."""
        async with self._lock:
            await self._reset()
