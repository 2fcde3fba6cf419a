"""The hand-written Struct/Value conversions agree with protobuf's json_format."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from service.api import convert
from service.domain.errors import InvalidRequest
from service.store.rows import any_json as _any_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_to_value_matches_parse_dict(value: Any) -> None:
    expected = json_format.ParseDict(convert.jsonable(value), struct_pb2.Value())
    assert convert.to_value(value) == expected


@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_to_struct_matches_parse_dict_and_round_trips(value: dict[str, Any]) -> None:
    message = convert.to_struct(value)
    assert message == json_format.ParseDict(convert.jsonable(value), struct_pb2.Struct())
    assert convert.from_struct(convert.to_struct({"n": 3, "f": 2.5, "l": [1, [], {}]})) == {
        "n": 3,
        "f": 2.5,
        "l": [1, [], {}],
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.inf, "inf"),
        (dt.datetime(2030, 1, 1, tzinfo=dt.UTC), "2030-01-01T00:00:00+00:00"),
        (b"\x00\x01", "AAE="),
        ((1, 2), [1, 2]),
    ],
)
def test_non_json_values_become_json(value: Any, expected: Any) -> None:
    assert json_format.MessageToDict(convert.to_value(value)) == expected


@given(st.datetimes(timezones=st.just(dt.UTC)))
def test_to_timestamp_matches_from_datetime(moment: dt.datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(moment)
    assert convert.to_timestamp(moment) == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: convert.from_list_value(json_format.ParseDict(["a\x00b"], struct_pb2.ListValue())),
        lambda: convert.from_struct(json_format.ParseDict({"k\x00": 1}, struct_pb2.Struct())),
        lambda: convert.from_struct(json_format.ParseDict({"k": [{"x": "\x00"}]}, struct_pb2.Struct())),
    ],
)
def test_nul_characters_are_refused(make: Any) -> None:
    with pytest.raises(InvalidRequest, match="NUL"):
        make()


def test_worker_json_without_nul_for_postgresql() -> None:
    text = _any_json({"message": "a\x00b", "k\x00": ["\x00", 2**70]})
    assert "\\u0000" not in text
    assert json.loads(text) == {"message": "a\ufffdb", "k\ufffd": ["\ufffd", 2**70]}
