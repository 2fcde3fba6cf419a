"""Pure pieces of the worker library: bounded retries, STARTED start times, backend URLs."""

from __future__ import annotations

import datetime as dt

import pytest
from celery.exceptions import BackendStoreError
from redis.exceptions import ConnectionError as RedisConnectionError

from service.results.document import parse_document
from taskgate.worker.backend import backend_url
from taskgate.worker.heartbeat import heartbeat_ttl
from taskgate.worker.retry import bounded, is_transient

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_bounded_retries_transient_errors_then_succeeds() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RedisConnectionError("down")
        return "ok"

    assert bounded(flaky, what="t", first_delay=0) == "ok"
    assert len(calls) == 3


def test_bounded_gives_up_after_its_attempts_and_never_retries_other_errors() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        bounded(down, what="t", attempts=3, first_delay=0)
    assert len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise TypeError("not JSON")

    with pytest.raises(TypeError):
        bounded(broken, what="t", first_delay=0)
    assert len(calls) == 4


def test_a_store_error_caused_by_a_lost_connection_is_transient() -> None:
    try:
        try:
            raise RedisConnectionError("down")
        except RedisConnectionError:
            raise BackendStoreError("failed to store") from None
    except BackendStoreError as exc:
        wrapped = exc
    assert is_transient(wrapped)  # the context survives "from None"
    assert not is_transient(BackendStoreError("value too large"))


def test_started_carries_the_workers_start_time() -> None:
    stamped = "2026-01-02T03:04:01.250000+00:00"
    document = {"status": "STARTED", "result": {"pid": 1, "hostname": "w@h", "start_time": stamped}}
    update = parse_document("t", document, NOW)
    assert update is not None and update.start_time == dt.datetime.fromisoformat(stamped)


def test_started_without_a_start_time_is_seen_when_observed() -> None:
    update = parse_document("t", {"status": "STARTED", "result": {"pid": 1, "hostname": "w@h"}}, NOW)
    assert update is not None and update.start_time == NOW


@pytest.mark.parametrize(
    ("setting", "url"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("rediss://h/1", "rediss://h/1"),
        ("redis+socket:///tmp/r.sock", "socket:///tmp/r.sock"),
        (None, None),
    ],
)
def test_backend_url_is_what_celery_passes_the_class(setting: str | None, url: str | None) -> None:
    assert backend_url(setting) == url


def test_heartbeat_lives_three_intervals() -> None:
    assert heartbeat_ttl(5) == 15
    assert heartbeat_ttl(0.1) == 1
