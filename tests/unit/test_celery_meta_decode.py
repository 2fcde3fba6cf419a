"""Result documents decode as kombu decodes them, whichever decoder does the work."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest
from kombu.utils.json import dumps, loads

from service.results.document import _decode


@pytest.mark.parametrize(
    "result",
    [
        {"current": 3, "total": 10, "message": "step é", "details": {"x": [1, 2.5, None, True]}},
        2**70,
        -(2**64) - 1,
        12345678901234567890.5,
        dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        uuid.UUID(int=7),
        decimal.Decimal("1.10"),
        "a string with 12345678901234567890 in it",
    ],
)
def test_same_as_kombu(result: Any) -> None:
    payload = dumps({"status": "SUCCESS", "result": result, "task_id": "t"})
    assert _decode(payload) == loads(payload)
    assert _decode(payload.encode()) == loads(payload)
