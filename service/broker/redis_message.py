"""Celery task messages for kombu's Redis transport, built without Celery.

``send_task`` costs about 0.5 ms of Python per call (kombu builds a Redis client object for
every publish); the message it leaves in Redis is a small JSON document. This module builds
the same document — protocol v2, JSON body, the headers and properties ``send_task``
writes — so the publisher can LPUSH a whole batch in one command. The integration tests
compare it, field by field, with what ``send_task`` itself stores, and the real worker runs
every task the tests send through it.

Layout on Redis (kombu 5.7, ``kombu.transport.redis``): the message is LPUSHed on the list
named after the queue (``global_keyprefix`` in front); a priority other than 0 goes to the
list ``<queue>\\x06\\x16<step>`` where ``step`` is the largest of ``priority_steps`` not above
it (0 is the highest priority on Redis).
"""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.domain.model import Delivery
from taskgate.worker.contract import KOMBU_BINDING_PERMANENT_PREFIX, KOMBU_BINDING_PREFIX

#: kombu's separator between a queue name and its priority step.
PRIORITY_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
DEFAULT_QUEUE = "celery"
#: Celery's ``argsrepr_maxsize`` / ``kwargsrepr_maxsize``.
REPR_MAX = 1024

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True)
class RedisLayout:
    """Where kombu's Redis transport keeps queues (from ``broker_transport_options``)."""

    key_prefix: str = ""
    priority_steps: Sequence[int] = DEFAULT_PRIORITY_STEPS
    sep: str = PRIORITY_SEP
    default_queue: str = DEFAULT_QUEUE
    #: Celery's reply_to for this process (unused without a result backend, but always set).
    reply_to: str = field(default_factory=lambda: str(uuid.uuid4()))
    origin: str = field(default_factory=lambda: f"gen{os.getpid()}@{socket.gethostname()}")

    def queue_name(self, delivery: Delivery) -> str:
        """The queue a delivery goes to (the routing key)."""
        return delivery.queue or self.default_queue

    def list_key(self, delivery: Delivery) -> str:
        """The Redis list the message is pushed on."""
        queue = self.queue_name(delivery)
        step = self.priority_step(delivery.priority or 0)
        name = f"{queue}{self.sep}{step}" if step else queue
        return f"{self.key_prefix}{name}"

    def __post_init__(self) -> None:
        # sorted once here, not for every message
        object.__setattr__(self, "priority_steps", tuple(sorted(self.priority_steps)))

    def priority_step(self, priority: int) -> int:
        """kombu's mapping of a priority (clamped to 0 to 9) onto the configured steps."""
        priority = max(min(priority, 9), 0)
        steps = self.priority_steps
        return steps[max(bisect.bisect(steps, priority) - 1, 0)]

    def binding_keys(self, queue: str) -> tuple[str, str, str]:
        """The two binding sets kombu declares for a queue, and their member."""
        member = f"{queue}{self.sep * 2}{queue}"
        return (
            f"{self.key_prefix}{KOMBU_BINDING_PREFIX}{queue}",
            f"{self.key_prefix}{KOMBU_BINDING_PERMANENT_PREFIX}{queue}",
            member,
        )


def _repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_MAX else f"{text[: REPR_MAX - 3]}..."


def build_message(delivery: Delivery, layout: RedisLayout, now: dt.datetime) -> bytes:
    """The JSON document ``send_task`` would store for ``delivery`` (protocol v2); a
    delivery carrying Celery's own ``message`` (a workflow step) keeps its headers and body."""
    if delivery.message is not None:
        return _document(delivery, delivery.message["body"], delivery.message["headers"], layout, now)
    body = orjson.dumps([delivery.args, delivery.kwargs, _EMBED])
    eta = delivery.run_time.isoformat() if delivery.run_time > now else None
    expires = delivery.expire_time.isoformat() if delivery.expire_time is not None else None
    headers: dict[str, Any] = {
        "lang": "py",
        "task": delivery.task_name,
        "id": delivery.task_id,
        "shadow": None,
        "eta": eta,
        "expires": expires,
        "group": None,
        "group_index": None,
        "retries": 0,
        # Celery's order: [hard, soft] (``amqp.as_task_v2``)
        "timelimit": [delivery.time_limit, delivery.soft_time_limit],
        "root_id": delivery.task_id,
        "parent_id": None,
        "argsrepr": _repr(delivery.args) if delivery.args else "()",
        "kwargsrepr": _repr(delivery.kwargs),
        "origin": layout.origin,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if delivery.headers:
        headers.update(delivery.headers)
    if delivery.trace_headers:
        headers.update(delivery.trace_headers)
    return _document(delivery, body, headers, layout, now)


def _document(
    delivery: Delivery,
    body: bytes | list[Any],
    headers: dict[str, Any],
    layout: RedisLayout,
    now: dt.datetime,
) -> bytes:
    """The message around ``body`` (JSON, or the value to encode) and ``headers``."""
    if not isinstance(body, bytes):
        body = orjson.dumps(body)
        headers = {**headers, "origin": layout.origin}
    properties: dict[str, Any] = {
        "correlation_id": delivery.task_id,
        "reply_to": layout.reply_to,
        "delivery_mode": 2,
    }
    if delivery.expire_time is not None:
        remaining = max((delivery.expire_time - now).total_seconds(), 0.0)
        properties["expiration"] = str(int(remaining * 1000))
    properties["delivery_info"] = {"exchange": "", "routing_key": layout.queue_name(delivery)}
    properties["priority"] = delivery.priority or 0
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = str(uuid.uuid4())
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return orjson.dumps(message)
