"""The garbage-collector policy: when it reclaims, and what it does to the collector's settings."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator

import pytest

from service.runtime.gcpolicy import NO_FULL_COLLECTIONS, FreezeTally, GcPolicy, ReclaimRule


@pytest.fixture
def restore_gc() -> Iterator[None]:
    """Put the collector back as it was (thresholds, nothing frozen) after the test."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


RULE = ReclaimRule(quiet_every=600.0, reclaim_every=3600.0)


def test_no_reclaim_while_busy_before_the_periodic_one() -> None:
    assert RULE.reason(3599.0, quiet=False, busy_since_reclaim=True) is None


def test_periodic_reclaim_quiet_or_not() -> None:
    assert RULE.reason(3600.0, quiet=False, busy_since_reclaim=True) == "periodic"
    assert RULE.reason(3600.0, quiet=True, busy_since_reclaim=False) == "periodic"


def test_quiet_reclaim_needs_streams_since_the_last_one_and_enough_time() -> None:
    assert RULE.reason(600.0, quiet=True, busy_since_reclaim=True) == "quiet"
    assert RULE.reason(599.0, quiet=True, busy_since_reclaim=True) is None
    assert RULE.reason(1200.0, quiet=True, busy_since_reclaim=False) is None  # an idle process


def test_freeze_tally_keeps_the_count_and_the_longest() -> None:
    tally = FreezeTally()
    for ms in (0.4, 2.5, 1.0):
        tally.add(ms)
    assert (tally.count, tally.max_ms) == (3, 2.5)


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        GcPolicy(interval=0)


@pytest.mark.usefixtures("restore_gc")
def test_managed_start_freezes_and_turns_full_collections_off() -> None:
    policy = GcPolicy("managed")
    policy.start()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[2] == NO_FULL_COLLECTIONS


@pytest.mark.usefixtures("restore_gc")
def test_python_mode_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    GcPolicy("python").start()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.usefixtures("restore_gc")
def test_reclaim_frees_a_cycle_that_was_frozen(caplog: pytest.LogCaptureFixture) -> None:
    policy = GcPolicy("managed")
    policy.start()
    _Cycle()  # unreachable at once, but only a collection can free it
    gc.freeze()  # as a step would once it is old
    with caplog.at_level(logging.INFO, logger="service.runtime.gcpolicy"):
        assert policy.reclaim("test") >= 1
    assert "reclaim (test) freed" in caplog.text
    assert gc.get_freeze_count() > 0  # frozen again afterwards


@pytest.mark.usefixtures("restore_gc")
def test_steps_reclaim_once_quiet_after_streams(caplog: pytest.LogCaptureFixture) -> None:
    open_streams = [1]
    rule = ReclaimRule(quiet_every=100.0, reclaim_every=1e6)
    policy = GcPolicy("managed", quiet=lambda: not open_streams, rule=rule, report_every=1e9)
    policy.start()
    base = time.monotonic()  # offsets far larger than the test's own run time
    with caplog.at_level(logging.INFO, logger="service.runtime.gcpolicy"):
        policy.step(base + 50.0)  # busy: nothing due
        open_streams.clear()
        policy.step(base + 60.0)  # quiet, too soon
        assert "reclaim" not in caplog.text
        policy.step(base + 150.0)  # quiet, streams since, long enough
        assert "reclaim (quiet)" in caplog.text
        caplog.clear()
        policy.step(base + 300.0)  # still quiet, no stream since: idle, nothing to do
        assert "reclaim" not in caplog.text
