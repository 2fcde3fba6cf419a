"""AMQP 0-9-1 publish frames built by hand, and a batch of them written as one buffer.

pamqp marshals a message's properties through a generic, reflective encoder (about 115 µs
per Celery message here, most of it the headers table); ``aiormq.Channel.basic_publish``
adds one socket write and one event-loop turn per message. This module encodes the same
bytes directly — ``encode_table`` is pamqp's ``field_table`` (keys sorted, the smallest
integer type, ``S`` long strings, ``V`` for None, ``F`` tables, ``A`` arrays; anything rarer is
handed to pamqp itself) and ``publish_frames`` the ``Basic.Publish`` method, content
header and body frames pamqp would write; ``tests/unit/test_amqp_frames.py`` compares
them byte for byte with pamqp. ``publish_batch`` then writes a whole chunk of messages as
one buffer and registers each message's confirmation future with the channel exactly as
``basic_publish`` does, so the channel's own Ack/Nack/Return handling resolves them. It
uses the channel's bookkeeping attributes (``lock``, ``delivery_tag``, ``confirmations``,
``message_id_delivery_tag``, ``write_queue``, ``max_content_size``): aiormq is pinned
(requirements/runtime.txt) and the tests run every message through a real RabbitMQ and
worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp import encode

log = logging.getLogger(__name__)

#: Messages written as one buffer (one drain) between two awaits.
CHUNK = 250
#: AMQP frame types and the frame-end octet.
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_END = 1, 2, 3, b"\xce"
#: ``Basic`` class id and ``Basic.Publish`` method id.
BASIC, PUBLISH = 60, 40

_frame_head = struct.Struct(">BHI").pack
_long = struct.Struct(">I").pack
_content_head = struct.Struct(">HxxQ").pack
_flags = struct.Struct(">H").pack
#: pamqp's smallest-type choice for the integers a Celery header holds (``b``, a signed octet)
_SMALL_INTS = {value: b"b" + struct.pack(">b", value) for value in range(-128, 128)}
_KEYS: dict[str, bytes] = {}
_KEY_CACHE_MAX = 4096


def _short(value: str) -> bytes:
    """An AMQP short string (pamqp's ``short_string``)."""
    data = value.encode()
    if len(data) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")
    return bytes((len(data),)) + data


def _key(name: str) -> bytes:
    """A field-table key, cached: the same few names recur in every Celery message."""
    encoded = _KEYS.get(name)
    if encoded is None:
        raw = name.encode()
        if len(raw) > 128:  # pamqp truncates (and warns): identical bytes
            return bytes(encode.short_string(raw[:128].decode("utf-8", "ignore")))
        encoded = bytes((len(raw),)) + raw
        if len(_KEYS) < _KEY_CACHE_MAX:
            _KEYS[name] = encoded
    return encoded


def _value(value: Any) -> bytes:
    """One field value, as ``pamqp.encode.encode_table_value`` writes it."""
    kind = type(value)
    if kind is str:
        data: bytes = value.encode()
        return b"S" + _long(len(data)) + data
    if value is None:
        return b"V"
    if kind is int and not encode.DEPRECATED_RABBITMQ_SUPPORT:
        small = _SMALL_INTS.get(value)
        return small if small is not None else bytes(encode.table_integer(value))
    if kind is dict:
        return b"F" + encode_table(value)
    if kind is list:
        data = b"".join([_value(item) for item in value])
        return b"A" + _long(len(data)) + data
    return bytes(encode.encode_table_value(value))  # bool, float, Decimal, datetime, subclasses: pamqp's


def encode_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table, byte for byte what ``pamqp.encode.field_table`` returns."""
    if not table:
        return b"\x00\x00\x00\x00"
    data = b"".join([_key(name) + _value(table[name]) for name in sorted(table)])
    return _long(len(data)) + data


class TableTemplate:
    """A field table whose keys are known and most of whose values never change, encoded
    once: ``encode`` only encodes the values that vary and joins them with the fixed bytes
    between them (the bytes ``encode_table`` gives for the whole table)."""

    def __init__(self, variable: Sequence[str], fixed: Mapping[str, Any]) -> None:
        if set(variable) & set(fixed):
            raise ValueError("a key is both variable and fixed")
        #: the variable keys in the order ``encode`` takes their values (sorted, as encoded)
        self.variable = tuple(sorted(variable))
        segments: list[bytes] = []
        pending = b""
        for name in sorted([*variable, *fixed]):
            if name in fixed:
                pending += _key(name) + _value(fixed[name])
            else:
                segments.append(pending + _key(name))
                pending = b""
        self._segments = tuple(segments)
        self._tail = pending
        #: each variable key's last value and its encoding (a task name, an empty
        #: ``kwargsrepr``, the time limits repeat from message to message)
        self._last: list[tuple[str, bytes]] = [("", b"")] * len(segments)

    def encode(self, values: Sequence[Any]) -> bytes:
        """The table with ``values`` for the variable keys (in ``variable``'s order)."""
        parts: list[bytes] = []
        last = self._last
        for index, (segment, value) in enumerate(zip(self._segments, values, strict=True)):
            if type(value) is str:
                data: bytes = value.encode()
                parts += (segment, b"S", _long(len(data)), data)
                continue
            shape = repr(value)  # equal values of other types (1, 1.0, True) encode differently
            previous, encoded = last[index]
            if shape != previous:
                encoded = _value(value)
                last[index] = (shape, encoded)
            parts += (segment, encoded)
        parts.append(self._tail)
        data = b"".join(parts)
        return _long(len(data)) + data


@dataclass(frozen=True)
class MessageProperties:
    """The ``Basic`` properties a Celery message carries (kombu's AMQP transport), in the
    order and with the flags of AMQP 0-9-1; None (or an empty string) leaves one out."""

    content_type: str | None = None
    content_encoding: str | None = None
    #: a table, or one encoded already (``TableTemplate.encode``)
    headers: Mapping[str, Any] | bytes | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    message_id: str | None = None

    def encode(self, message_id: str | None = None) -> bytes:
        """The property flags and values (``pamqp.commands.Basic.Properties.marshal``);
        ``message_id``, when given, in place of the field's."""
        flags = 0
        parts: list[bytes] = []
        for flag, text in ((0x8000, self.content_type), (0x4000, self.content_encoding)):
            if text:
                flags |= flag
                parts.append(_short(text))
        if self.headers is not None:
            flags |= 0x2000
            headers = self.headers
            parts.append(headers if isinstance(headers, bytes) else encode_table(headers))
        for flag, octet in ((0x1000, self.delivery_mode), (0x0800, self.priority)):
            if octet is not None:
                flags |= flag
                parts.append(bytes((octet,)))
        for flag, text in (
            (0x0400, self.correlation_id),
            (0x0200, self.reply_to),
            (0x0080, message_id or self.message_id),
        ):
            if text:
                flags |= flag
                parts.append(_short(text))
        return _flags(flags) + b"".join(parts)


def method_frame(channel: int, routing_key: str, *, exchange: str = "", mandatory: bool = True) -> bytes:
    """The ``Basic.Publish`` method frame (ticket 0, ``immediate`` off)."""
    payload = (
        struct.pack(">HHH", BASIC, PUBLISH, 0) + _short(exchange) + _short(routing_key) + bytes((mandatory,))
    )
    return _frame_head(FRAME_METHOD, channel, len(payload)) + payload + FRAME_END


def publish_frames(
    channel: int, method: bytes, properties: bytes, body: bytes, max_content_size: int
) -> list[bytes]:
    """A message's frames: ``method`` (from ``method_frame``), the content header carrying
    the encoded ``properties``, and the body split into frames of ``max_content_size``."""
    header = _content_head(BASIC, len(body)) + properties
    frames = [method, _frame_head(FRAME_HEADER, channel, len(header)), header, FRAME_END]
    for start in range(0, len(body), max_content_size):
        piece = body[start : start + max_content_size]
        frames += (_frame_head(FRAME_BODY, channel, len(piece)), piece, FRAME_END)
    return frames


#: One outgoing message: routing key (the queue), body, and its properties without
#: ``message_id`` (``publish_batch`` adds the id the channel tracks returns by).
Outgoing = tuple[str, bytes, MessageProperties]


async def _outcome(future: asyncio.Future[None]) -> BaseException | None:
    """Wait for a future of the channel's; its failure (the channel closed: aiormq sets
    ``CancelledError`` too) is returned, not raised. Cancelling the caller still cancels."""
    await asyncio.wait([future])
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


class _Batch:
    """The outcome of one batch's messages, settled by the broker's confirms.

    ``states[i]`` is ``PENDING`` until message ``i`` (delivery tag ``first + i``) is
    acknowledged (``ACKED``), negatively acknowledged or returned (``FAILED``).
    """

    __slots__ = ("cursor", "done", "first", "states", "unsettled")

    def __init__(self, first: int, size: int, done: asyncio.Future[None]) -> None:
        self.first = first
        self.states = bytearray(size)
        self.unsettled = size
        #: every message before ``cursor`` is settled (confirms mostly arrive in order)
        self.cursor = 0
        self.done = done

    @property
    def last(self) -> int:
        return self.first + len(self.states) - 1

    def settle(self, upto: int, state: int, *, multiple: bool) -> None:
        """Settle delivery tag ``upto`` (and, when ``multiple``, every pending tag before it)."""
        states = self.states
        end = min(upto - self.first, len(states) - 1)
        start = self.cursor if multiple else end
        for index in range(start, end + 1):
            if states[index] == PENDING:
                states[index] = state
                self.unsettled -= 1
        while self.cursor < len(states) and states[self.cursor] != PENDING:
            self.cursor += 1
        if not self.unsettled and not self.done.done():
            self.done.set_result(None)


PENDING, ACKED, FAILED = 0, 1, 2


class _Returned:
    """Stands in ``channel.confirmations`` for a message: aiormq's handler of a returned
    (unroutable) message calls ``set_exception`` on it, which marks the message FAILED."""

    __slots__ = ("batch", "tag")

    def __init__(self, batch: _Batch, tag: int) -> None:
        self.batch, self.tag = batch, tag

    def set_exception(self, exc: BaseException) -> None:
        self.batch.settle(self.tag, FAILED, multiple=False)


class FramePublisher:
    """Writes batches of messages on one aiormq channel in confirm mode and settles them
    from the broker's confirms itself: one future per batch, not one per message (aiormq
    resolves a future and schedules several callbacks per confirmed message)."""

    def __init__(self, channel: aiormq.Channel, id_prefix: str) -> None:
        self._raw: Any = cast(Any, channel)  # its bookkeeping is not in aiormq's typed interface
        self._id_prefix = id_prefix
        self._methods: dict[str, bytes] = {}
        self._batches: collections.deque[_Batch] = collections.deque()
        self._raw._on_confirm_frame = self._on_confirm_frame  # the channel's reader calls it per Ack/Nack

    def _method(self, routing_key: str) -> bytes:
        method = self._methods.get(routing_key)
        if method is None:
            method = self._methods[routing_key] = method_frame(self._raw.number, routing_key)
        return method

    async def publish(self, messages: Sequence[Outgoing]) -> list[bool]:
        """Write ``(routing_key, body, properties)`` messages on the default exchange,
        mandatory, and wait for the broker to settle every one.

        Returns:
            Per message: True when the broker acknowledged it; False when it was
            negatively acknowledged, returned (unroutable), or not confirmed before the
            channel closed.

        Raises:
            ConnectionError: the channel closed before the batch was written.
        """
        if not messages:
            return []
        raw = self._raw
        async with raw.lock:
            batch = _Batch(raw.delivery_tag + 1, len(messages), raw.create_future())
            self._batches.append(batch)
            number, size = raw.number, raw.max_content_size
            confirmations, ids, prefix = raw.confirmations, raw.message_id_delivery_tag, self._id_prefix
            for start in range(0, len(messages), CHUNK):
                frames: list[bytes] = []
                for routing_key, body, properties in messages[start : start + CHUNK]:
                    raw.delivery_tag += 1
                    tag: int = raw.delivery_tag
                    message_id = f"{prefix}{tag}"
                    confirmations[tag] = _Returned(batch, tag)
                    ids[message_id] = tag
                    encoded = properties.encode(message_id)
                    frames += publish_frames(number, self._method(routing_key), encoded, body, size)
                drained = raw.create_future()
                await raw.write_queue.put(
                    ChannelFrame(payload=b"".join(frames), should_close=False, drain_future=drained)
                )
                if (failure := await _outcome(drained)) is not None:
                    self._forget(batch)
                    raise ConnectionError(f"the channel closed: {failure!r}") from failure
        try:
            if (failure := await _outcome(batch.done)) is not None:
                log.debug("channel closed with %d message(s) unconfirmed: %r", batch.unsettled, failure)
        finally:
            self._forget(batch)
        return [state == ACKED for state in batch.states]

    def _forget(self, batch: _Batch) -> None:
        """Drop a settled (or abandoned) batch's bookkeeping from the channel."""
        with contextlib.suppress(ValueError):
            self._batches.remove(batch)
        confirmations, ids, prefix = (
            self._raw.confirmations,
            self._raw.message_id_delivery_tag,
            self._id_prefix,
        )
        for tag in range(batch.first, batch.last + 1):
            confirmations.pop(tag, None)
            ids.pop(f"{prefix}{tag}", None)

    async def _on_confirm_frame(self, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        """``Basic.Ack`` / ``Basic.Nack`` from the broker: settle the tags it covers."""
        state = ACKED if isinstance(frame, spec.Basic.Ack) else FAILED
        tag, multiple = frame.delivery_tag, bool(getattr(frame, "multiple", False))
        for batch in list(self._batches):
            if batch.first > tag:
                break
            if batch.last >= tag or multiple:
                batch.settle(tag, state, multiple=multiple)
