"""The pace of decisions ahead (``service.usecases.schedule_hold.paced_limit``)."""

from __future__ import annotations

import datetime as dt

from service.usecases.schedule_hold import PACED_POLL, RESERVE, Pace, paced_limit

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def test_nothing_waiting_claims_nothing() -> None:
    assert paced_limit(0, 0, None, NOW, 0.5, 1000) == 0


def test_urgent_schedules_are_claimed_at_once_up_to_the_batch() -> None:
    assert paced_limit(300, 0, None, NOW, 0.5, 1000) == 300
    assert paced_limit(5000, 0, None, NOW, 0.5, 1000) == 1000


def test_later_schedules_are_spread_evenly_until_the_reserve_before_the_earliest() -> None:
    earliest = NOW + RESERVE + dt.timedelta(seconds=50)
    assert paced_limit(0, 10_000, earliest, NOW, 0.5, 1000) == 100  # 10,000 over 50 s, 0.5 s a round
    assert paced_limit(7, 10_000, earliest, NOW, 0.5, 1000) == 107


def test_the_share_grows_as_the_slot_nears_and_never_leaves_any_for_the_reserve() -> None:
    earliest = NOW + RESERVE + dt.timedelta(seconds=0.4)
    assert paced_limit(0, 800, earliest, NOW, 0.5, 1000) == 800
    assert paced_limit(0, 800, NOW, NOW, 0.5, 1000) == 800
    assert paced_limit(0, 10_000, NOW, NOW, 0.5, 1000) == 1000


def test_rounds_come_less_often_while_only_decisions_ahead_wait() -> None:
    pace = Pace(0.5)
    assert pace.pause(urgent=3) == 0.5
    assert pace.pause(urgent=0) == PACED_POLL


def test_the_share_is_sized_by_the_rounds_real_interval() -> None:
    pace = Pace(0.5)
    earliest = NOW + RESERVE + dt.timedelta(seconds=50)
    assert pace.limit(0, 10_000, earliest, NOW, 1000) == 400  # the first round assumes MAX_TICK
    assert pace.limit(0, 10_000, earliest, NOW, 1000) == 100  # at once: the poll interval
