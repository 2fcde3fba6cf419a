"""The hand-written AMQP encoder writes exactly the bytes pamqp writes."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp import encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from service.broker.amqp import build_amqp, encoded_headers, task_headers
from service.broker.amqp_frames import (
    ACKED,
    FAILED,
    MessageProperties,
    _Batch,
    _Returned,
    encode_table,
    method_frame,
    publish_frames,
)
from service.domain.model import Delivery

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

DELIVERIES = [
    Delivery("id-1", "demo.add", [2, 3], {}, NOW),
    Delivery(
        "id-2",
        "demo.record",
        ["ünïcode", 1.5, None, True, [1, {"a": 2}]],
        {"k": "v" * 300, "big": 2**40, "neg": -70_000},
        NOW + dt.timedelta(hours=1),
        queue="other",
        priority=7,
        expire_time=NOW + dt.timedelta(days=1),
        headers={"x-custom": "1"},
        time_limit=30.0,
        soft_time_limit=None,
        trace_headers={"traceparent": "00-abc-def-01"},
    ),
]

TABLES: list[dict[str, Any]] = [
    {},
    {"b": 1, "a": None, "c": "x"},
    {"ints": [0, 127, 128, -129, 40_000, 70_000, 3_000_000_000, -(2**40)]},
    {"nested": {"deeper": {"list": [[], {}, "s", None]}}, "stamps": {}},
    {"bool": True, "false": False, "float": 0.25, "decimal": decimal.Decimal("1.25")},
    {"when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "bytes": bytearray(b"\x00\x01")},
    {"k" * 200: "a key pamqp truncates to 128 bytes", "é" * 100: 1},
]


@pytest.mark.parametrize("table", TABLES)
def test_a_field_table_is_what_pamqp_encodes(table: dict[str, Any]) -> None:
    assert encode_table(table) == encode.field_table(table)


def test_a_value_pamqp_refuses_is_refused_too() -> None:
    with pytest.raises(TypeError):
        encode_table({"tuple": (1, 2)})
    with pytest.raises(TypeError):
        encode.field_table({"tuple": (1, 2)})  # type: ignore[dict-item]


def pamqp_properties(
    delivery: Delivery, properties: MessageProperties, message_id: str
) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=task_headers(delivery, "gen1@host", NOW),
        delivery_mode=properties.delivery_mode,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        message_id=message_id,
    )


@pytest.mark.parametrize("delivery", DELIVERIES, ids=lambda d: d.task_id)
@pytest.mark.parametrize("frame_max", [131_072, 100])
def test_a_celery_message_is_framed_as_pamqp_frames_it(delivery: Delivery, frame_max: int) -> None:
    body, properties = build_amqp(delivery, origin="gen1@host", reply_to="reply", now=NOW)
    queue = delivery.queue or "celery"
    ours = b"".join(
        publish_frames(
            5, method_frame(5, queue), properties.encode("m.1"), body, max_content_size=frame_max - 8
        )
    )
    frames: list[Any] = [
        spec.Basic.Publish(exchange="", routing_key=queue, mandatory=True),
        ContentHeader(properties=pamqp_properties(delivery, properties, "m.1"), body_size=len(body)),
    ]
    frames += [ContentBody(body[i : i + frame_max - 8]) for i in range(0, len(body), frame_max - 8)]
    assert ours == b"".join(pamqp.frame.marshal(frame, 5) for frame in frames)


@pytest.mark.parametrize(
    "delivery", [*DELIVERIES, dataclasses.replace(DELIVERIES[1], headers={}, trace_headers=None)]
)
def test_the_templated_headers_are_the_encoded_dict(delivery: Delivery) -> None:
    encoded = encoded_headers(delivery, "gen1@host", NOW)
    assert encoded == encode.field_table(task_headers(delivery, "gen1@host", NOW))


def test_the_headers_are_celerys_protocol_v2() -> None:
    headers = task_headers(DELIVERIES[1], "gen1@host", NOW)
    assert headers["id"] == headers["root_id"] == "id-2"
    assert headers["timelimit"] == [30.0, None]
    assert headers["eta"] == (NOW + dt.timedelta(hours=1)).isoformat()
    assert headers["traceparent"] == "00-abc-def-01"


async def test_a_batch_is_settled_by_multiple_and_single_confirms() -> None:
    loop = asyncio.get_running_loop()
    batch = _Batch(first=11, size=5, done=loop.create_future())
    batch.settle(12, ACKED, multiple=True)  # tags 11 and 12
    _Returned(batch, 13).set_exception(RuntimeError("returned"))  # unroutable, then acked
    batch.settle(13, ACKED, multiple=False)
    assert not batch.done.done()
    batch.settle(15, FAILED, multiple=False)  # a nack out of order
    batch.settle(15, ACKED, multiple=True)  # covers 14 only: 13 and 15 stay failed
    assert batch.done.done()
    assert list(batch.states) == [ACKED, ACKED, FAILED, ACKED, FAILED]


async def test_a_multiple_confirm_beyond_the_batch_settles_all_of_it() -> None:
    batch = _Batch(first=1, size=3, done=asyncio.get_running_loop().create_future())
    batch.settle(40, ACKED, multiple=True)
    assert batch.done.done() and list(batch.states) == [ACKED] * 3
