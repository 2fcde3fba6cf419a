"""The ListTasks filter parser, order_by, page sizes and page tokens (no I/O)."""

from __future__ import annotations

import datetime as dt

import pytest

from service.api.listing import (
    MAX_DEPTH,
    decode_page_token,
    encode_page_token,
    page_size,
    parse_filter,
    parse_order_by,
)
from service.domain.errors import InvalidRequest
from service.domain.model import TaskState
from service.domain.query import All, Any, Compare, Field, Not, Op, PageKey

QUEUED = Compare(Field.STATE, Op.EQ, TaskState.QUEUED)


def test_empty_filter_is_none() -> None:
    assert parse_filter("") is None
    assert parse_filter("   ") is None


@pytest.mark.parametrize("op", ["=", "!=", "<", "<=", ">", ">="])
def test_every_comparison(op: str) -> None:
    assert parse_filter(f'queue {op} "q 1"') == Compare(Field.QUEUE, Op(op), "q 1")


def test_state_with_or_without_prefix() -> None:
    assert parse_filter("state = TASK_STATE_QUEUED") == QUEUED
    assert parse_filter("state = queued") == QUEUED


def test_prefix_match_on_task_name() -> None:
    assert parse_filter('task_name = "reports.*"') == Compare(Field.TASK_NAME, Op.EQ, "reports.", prefix=True)


def test_times_are_rfc3339_in_utc() -> None:
    node = parse_filter("create_time >= 2026-01-01T01:00:00+01:00")
    assert node == Compare(Field.CREATE_TIME, Op.GE, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))


def test_or_binds_tighter_than_and() -> None:
    a, b, c = (Compare(Field.QUEUE, Op.EQ, name) for name in "abc")
    assert parse_filter("queue = a OR queue = b AND queue = c") == All((Any((a, b)), c))
    assert parse_filter("queue = a AND queue = b OR queue = c") == All((a, Any((b, c))))
    assert parse_filter("queue = a queue = b") == All((a, b))  # juxtaposition is AND


def test_not_minus_and_parentheses() -> None:
    a, b = (Compare(Field.QUEUE, Op.EQ, name) for name in "ab")
    assert parse_filter("NOT (queue = a OR queue = b)") == Not(Any((a, b)))
    assert parse_filter("-queue = a") == Not(a)
    assert parse_filter("- (queue = a)") == Not(a)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("state =", "position 8: expected a value"),
        ("colour = red", "position 1: unknown field 'colour'"),
        ("state < QUEUED", "state takes only = and !="),
        ("state = DONE", "unknown state 'DONE'"),
        ("task_name < demo.*", "takes only = and !="),
        ("create_time > 2026-01-01T00:00:00", "no time zone"),
        ("end_time = soon", "not an RFC 3339 time"),
        ("(queue = a", "expected ')'"),
        ("queue = a)", "unexpected ')'"),
        ('queue = "a', "not closed"),
        ("queue = a AND", "expected a field name, found the end of the filter"),
        ("queue # a", "unexpected character '#'"),
        ("queue a", "expected a comparison"),
        ("(" * (MAX_DEPTH + 2) + "queue = a" + ")" * (MAX_DEPTH + 2), "nested deeper"),
        ("x" * 5000, "longer than"),
    ],
)
def test_errors_say_where_and_why(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_filter(text)
    assert fragment in str(caught.value)


def test_order_by() -> None:
    assert parse_order_by("") is True
    assert parse_order_by("create_time desc") is True
    assert parse_order_by("create_time") is False
    with pytest.raises(InvalidRequest):
        parse_order_by("task_name")


def test_page_size() -> None:
    assert page_size(0) == 50
    assert page_size(7) == 7
    assert page_size(5000) == 1000
    with pytest.raises(InvalidRequest):
        page_size(-1)


def test_page_token_round_trip_and_binding() -> None:
    key = PageKey(dt.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=dt.UTC), "abc")
    token = encode_page_token(key, "state = QUEUED", True)
    assert decode_page_token(token, "state = QUEUED", True) == key
    assert decode_page_token("", "anything", True) is None
    for flt, newest in (("state = FAILED", True), ("state = QUEUED", False)):
        with pytest.raises(InvalidRequest, match="another filter"):
            decode_page_token(token, flt, newest)
    with pytest.raises(InvalidRequest, match="not a token"):
        decode_page_token("garbage!", "state = QUEUED", True)
