"""Schedule specs: cron parsing, next-fire times around DST switches, and the firing plan."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from service.domain.errors import InvalidRequest
from service.domain.schedule import (
    OverlapPolicy,
    Schedule,
    TaskTemplate,
    Timing,
    check_schedule_id,
    cron_fields,
    plan,
    request_id_of,
)

UTC = dt.UTC
ANCHOR = dt.datetime(2025, 1, 1, tzinfo=UTC)


def slots(cron: str, zone: str, start: dt.datetime, count: int) -> list[str]:
    """The next ``count`` slots after ``start``, as local ISO times."""
    timing, local, moment = Timing(cron=cron, time_zone=zone), ZoneInfo(zone), start
    found = []
    for _ in range(count):
        moment = timing.next_after(moment, ANCHOR)
        found.append(moment.astimezone(local).isoformat())
    return found


@pytest.mark.parametrize(
    ("expression", "fields"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("  */15  9-17 * JAN,MAR mon-fri ", "*/15 9-17 * JAN,MAR mon-fri"),
    ],
)
def test_cron_forms(expression: str, fields: str) -> None:
    assert cron_fields(expression) == fields


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("* * * *", "five fields"),
        ("0 0 * * * *", "five fields"),
        ("61 * * * *", "Bad minute"),
        ("0 24 * * *", "Bad hour"),
        ("0 0 32 * *", "Bad day-of-month"),
        ("0 0 * FOO *", "Bad month"),
        ("0 0 30 2 *", "Bad day-of-month"),
        ("@often", "five fields"),
    ],
)
def test_bad_cron_names_the_problem(expression: str, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem) as caught:
        Timing(cron=expression)
    assert "cron" in str(caught.value)


def test_zone_interval_and_id_checks() -> None:
    with pytest.raises(InvalidRequest, match="time_zone 'Mars/Olympus'"):
        Timing(cron="@daily", time_zone="Mars/Olympus")
    with pytest.raises(InvalidRequest, match="at least 1 second"):
        Timing(interval=dt.timedelta(milliseconds=500))
    with pytest.raises(InvalidRequest, match="exactly one"):
        Timing(cron="@daily", interval=dt.timedelta(seconds=5))
    with pytest.raises(InvalidRequest, match="exactly one"):
        Timing()
    for bad in ("", "a b", "x" * 201, "é"):
        with pytest.raises(InvalidRequest, match="schedule_id"):
            check_schedule_id(bad)
    assert check_schedule_id("nightly.cleanup_v2-x") == "nightly.cleanup_v2-x"


def test_berlin_spring_forward_fires_skipped_time_once_right_after() -> None:
    # 2025-03-30: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that night
    start = dt.datetime(2025, 3, 29, 12, tzinfo=UTC)
    assert slots("30 2 * * *", "Europe/Berlin", start, 3) == [
        "2025-03-30T03:00:00+02:00",
        "2025-03-31T02:30:00+02:00",
        "2025-04-01T02:30:00+02:00",
    ]


def test_berlin_fall_back_fires_repeated_time_once() -> None:
    # 2025-10-26: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice
    start = dt.datetime(2025, 10, 25, 12, tzinfo=UTC)
    assert slots("30 2 * * *", "Europe/Berlin", start, 2) == [
        "2025-10-26T02:30:00+02:00",
        "2025-10-27T02:30:00+01:00",
    ]


def test_berlin_hourly_follows_real_time_across_both_switches() -> None:
    fall = dt.datetime(2025, 10, 25, 22, 30, tzinfo=UTC)  # 00:30 CEST
    assert slots("@hourly", "Europe/Berlin", fall, 4) == [
        "2025-10-26T01:00:00+02:00",
        "2025-10-26T02:00:00+02:00",
        "2025-10-26T02:00:00+01:00",  # the repeated hour fires too (celery#10107 skips it)
        "2025-10-26T03:00:00+01:00",
    ]
    spring = dt.datetime(2025, 3, 29, 23, 30, tzinfo=UTC)  # 00:30 CET
    assert slots("@hourly", "Europe/Berlin", spring, 3) == [
        "2025-03-30T01:00:00+01:00",
        "2025-03-30T03:00:00+02:00",
        "2025-03-30T04:00:00+02:00",
    ]


def test_new_york_both_switches() -> None:
    # 2025-03-09: 02:00 EST jumps to 03:00 EDT; 2025-11-02: 02:00 EDT goes back to 01:00 EST
    spring = dt.datetime(2025, 3, 8, 12, tzinfo=UTC)
    assert slots("30 2 * * *", "America/New_York", spring, 2) == [
        "2025-03-09T03:00:00-04:00",
        "2025-03-10T02:30:00-04:00",
    ]
    fall = dt.datetime(2025, 11, 1, 12, tzinfo=UTC)
    assert slots("30 1 * * *", "America/New_York", fall, 2) == [
        "2025-11-02T01:30:00-04:00",
        "2025-11-03T01:30:00-05:00",
    ]


def test_a_start_inside_the_repeated_hour_never_goes_back() -> None:
    # 01:10 EST (the second 01:10 of the night): 01:30 EDT is already past
    inside = dt.datetime(2025, 11, 2, 6, 10, tzinfo=UTC)
    assert slots("30 1 * * *", "America/New_York", inside, 1) == ["2025-11-03T01:30:00-05:00"]


def test_interval_slots_count_from_the_anchor() -> None:
    timing = Timing(interval=dt.timedelta(seconds=2))
    assert timing.next_after(ANCHOR, ANCHOR) == ANCHOR + dt.timedelta(seconds=2)
    assert timing.next_after(ANCHOR + dt.timedelta(seconds=3), ANCHOR) == ANCHOR + dt.timedelta(seconds=4)
    assert timing.next_after(ANCHOR + dt.timedelta(seconds=4), ANCHOR) == ANCHOR + dt.timedelta(seconds=6)


def schedule(**changes: object) -> Schedule:
    base = Schedule(
        schedule_id="s",
        timing=Timing(interval=dt.timedelta(seconds=10)),
        task=TaskTemplate("demo.add", [1, 2]),
        anchor_time=ANCHOR,
        create_time=ANCHOR,
        next_run_time=ANCHOR + dt.timedelta(seconds=10),
    )
    return Schedule(**{**{f: getattr(base, f) for f in base.__slots__}, **changes})  # type: ignore[arg-type]


def test_plan_on_time_fires_the_slot() -> None:
    now = ANCHOR + dt.timedelta(seconds=10.3)
    decided = plan(schedule(), now, previous_running=False)
    assert decided.fire == ANCHOR + dt.timedelta(seconds=10)
    assert decided.skipped == 0
    assert decided.next_run_time == ANCHOR + dt.timedelta(seconds=20)


def test_plan_catch_up_fires_latest_missed_slot_once() -> None:
    now = ANCHOR + dt.timedelta(seconds=1005)  # down through 100 slots; 1000 is 5 s old
    decided = plan(schedule(), now, previous_running=False)
    assert decided.fire == ANCHOR + dt.timedelta(seconds=1000)
    assert decided.skipped == 99
    assert decided.next_run_time == ANCHOR + dt.timedelta(seconds=1010)


def test_plan_beyond_the_window_fires_nothing() -> None:
    now = ANCHOR + dt.timedelta(seconds=1009, milliseconds=500)
    hourly = schedule(
        timing=Timing(cron="@hourly"),
        next_run_time=dt.datetime(2025, 1, 1, 1, tzinfo=UTC),
        catchup_window=dt.timedelta(seconds=0),
    )
    late = dt.datetime(2025, 1, 1, 3, 0, 30, tzinfo=UTC)  # 01:00, 02:00, 03:00 missed; 03:00 is 30 s old
    decided = plan(hourly, late, previous_running=False)
    assert (decided.fire, decided.skipped) == (None, 3)
    assert decided.next_run_time == dt.datetime(2025, 1, 1, 4, tzinfo=UTC)
    in_window = plan(schedule(catchup_window=dt.timedelta(seconds=0)), now, previous_running=False)
    assert in_window.fire == ANCHOR + dt.timedelta(seconds=1000)  # 9.5 s late: still on time


def test_plan_overlap() -> None:
    now = ANCHOR + dt.timedelta(seconds=10.1)
    skipped = plan(schedule(), now, previous_running=True)
    assert (skipped.fire, skipped.skipped) == (None, 1)
    allowed = plan(schedule(overlap_policy=OverlapPolicy.ALLOW), now, previous_running=True)
    assert allowed.fire == ANCHOR + dt.timedelta(seconds=10)


def test_request_id_is_per_schedule_and_slot() -> None:
    slot = ANCHOR + dt.timedelta(seconds=10)
    assert request_id_of(schedule(), slot) == request_id_of(schedule(), slot)
    assert request_id_of(schedule(), slot) != request_id_of(schedule(), slot + dt.timedelta(seconds=10))
    assert len(request_id_of(schedule(schedule_id="x" * 200), slot)) <= 255
