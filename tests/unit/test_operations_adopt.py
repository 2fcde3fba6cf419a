"""Adoption's pure parts: the origin a result document carries, and the row it makes."""

from __future__ import annotations

import datetime as dt

import orjson

from service.results.document import parse_payload
from service.store.adoption import adopted_row

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _doc(**extra: object) -> bytes:
    return orjson.dumps({"status": "SUCCESS", "result": 3, "date_done": "2026-01-02T03:04:06+00:00", **extra})


def test_result_extended_documents_carry_the_call() -> None:
    update = parse_payload("t1", _doc(name="demo.add", args=[1, 2], kwargs={"x": 1}, queue="q"), NOW)
    assert update is not None and update.origin is not None
    assert (update.origin.task_name, update.origin.args, update.origin.kwargs, update.origin.queue) == (
        "demo.add", [1, 2], {"x": 1}, "q",
    )  # fmt: skip
    plain = parse_payload("t1", _doc(), NOW)
    assert plain == update  # the origin takes no part in equality
    assert plain is not None and plain.origin is None


def test_adopted_row() -> None:
    update = parse_payload("t1", _doc(name="demo.add", args=[1, "a\x00"], kwargs=None, queue=None), NOW)
    assert update is not None
    row = adopted_row(update)
    assert row is not None
    assert (
        row["adopted"] and row["caller"] == "" and row["state"] == "QUEUED" and row["publish_after"] is None
    )
    assert row["args"] == [1, "a\ufffd"] and row["kwargs"] == {} and row["queue"] == ""
    assert row["create_time"] == NOW  # the earliest time the update knows


def test_not_adopted() -> None:
    for doc in (_doc(), _doc(name="celery.chord_unlock"), _doc(name="x" * 256)):
        update = parse_payload("t1", doc, NOW)
        assert update is not None and adopted_row(update) is None
    update = parse_payload("t" * 65, _doc(name="demo.add"), NOW)
    assert update is not None and adopted_row(update) is None
