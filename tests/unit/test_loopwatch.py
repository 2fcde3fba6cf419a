"""The event-loop stall monitor: its statistics, and that it sees a blocked loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from collections.abc import AsyncIterator

import pytest

from service.runtime.loopwatch import LoopWatch, StallStats, next_wait


def test_empty_stats_report_zeros() -> None:
    report = StallStats().report(1.0)
    assert (report.samples, report.p50_ms, report.p99_ms, report.max_ms) == (0, 0.0, 0.0, 0.0)


def test_percentiles_are_bucket_edges_never_above_the_max() -> None:
    stats = StallStats()
    for _ in range(98):
        stats.add(0.12)
    stats.add(7.3)
    stats.add(250.0)
    report = stats.report(2.0)
    assert report.samples == 100
    assert report.p50_ms == pytest.approx(0.15)  # the 0.10-0.15 ms bucket
    assert report.p99_ms == pytest.approx(7.35)  # the 99th of 100 samples
    assert report.max_ms == 250.0
    assert stats.percentile(100) == 250.0  # clamped to the exact maximum


@pytest.mark.parametrize("ms", [0.0, 0.049, 3.21, 9.99, 10.0, 42.5, 99.9, 100.0, 777.0, 12_345.0])
def test_percentiles_have_the_documented_resolution(ms: float) -> None:
    stats = StallStats()
    stats.add(ms)
    stats.add(ms)
    stats.add(ms * 20 + 1000)  # a larger maximum, so the percentile is not clamped to it
    p50 = stats.percentile(50)
    assert ms <= p50 <= max(ms * 1.1, ms + 0.05)


def test_stalls_beyond_the_histogram_keep_their_exact_maximum() -> None:
    stats = StallStats()
    stats.add(1e7)
    assert stats.report(1.0).max_ms == 1e7


def test_negative_lateness_counts_as_zero() -> None:
    stats = StallStats()
    stats.add(-0.3)
    assert stats.report(1.0).max_ms == 0.0
    assert stats.samples == 1


def test_reset_starts_a_new_window_and_counts_warnings() -> None:
    stats = StallStats(warn_ms=100.0)
    stats.add(150.0)
    stats.add(5.0)
    assert stats.report(1.0).over_warn == 1
    stats.reset()
    assert stats.report(1.0) == StallStats().report(1.0)


def test_report_line_is_parseable() -> None:
    stats = StallStats()
    stats.add(1.5)
    line = stats.report(3.0).line()
    match = re.search(
        r"event loop stalls since last report: samples=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+) max_ms=([\d.]+)",
        line,
    )
    assert match is not None
    assert int(match.group(1)) == 1
    assert float(match.group(4)) == 1.5


def test_busy_counts_only_the_running_part_of_a_stall() -> None:
    watch = LoopWatch()
    watch.add(late_ms=50.0, cpu_ms=3.0)  # late, but the thread hardly ran: it waited for a CPU
    watch.add(late_ms=10.0, cpu_ms=40.0)  # busy before the timer was even due, 10 ms past it
    report = watch.report()
    assert report.max_ms == 50.0
    assert report.busy_max_ms == 10.0
    assert "busy_max_ms=10.00" in report.line()


def test_full_collections_are_counted() -> None:
    watch = LoopWatch()
    watch.report()
    gc.collect()
    assert watch.report().gc_full >= 1


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        LoopWatch(interval=0)


@contextlib.asynccontextmanager
async def watching(watch: LoopWatch) -> AsyncIterator[None]:
    """Run ``watch``; the block starts on a fresh window and ends after two more samples."""
    task = asyncio.create_task(watch.run())
    try:
        while watch.report(reset=False).samples < 3:
            await asyncio.sleep(0.005)
        watch.report()  # a fresh window: only the block's deliberate stall is in it
        yield
        while watch.report(reset=False).samples < 2:
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_blocked_loop_shows_up_as_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(interval=0.005, warn_ms=30.0)
    with caplog.at_level(logging.WARNING, logger="service.runtime.loopwatch"):
        async with watching(watch):
            time.sleep(0.05)  # noqa: ASYNC251 - the deliberate stall under test
    report = watch.report()
    assert report.max_ms >= 40.0
    assert report.over_warn >= 1
    assert any("event loop stalled" in record.getMessage() for record in caplog.records)


async def test_a_busy_loop_shows_up_as_a_busy_stall() -> None:
    watch = LoopWatch(interval=0.005)
    async with watching(watch):
        start = time.thread_time()
        while time.thread_time() - start < 0.05:  # the deliberate stall: 50 ms of CPU on the loop
            pass
    report = watch.report()
    assert report.max_ms >= 40.0
    assert report.busy_max_ms >= 40.0


async def test_log_report_writes_one_line_and_resets(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch()
    task = asyncio.create_task(watch.run())
    try:
        while watch.report(reset=False).samples < 2:
            await asyncio.sleep(0.005)
        with caplog.at_level(logging.INFO, logger="service.runtime.loopwatch"):
            watch.log_report()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (line,) = [r.getMessage() for r in caplog.records if "since last report" in r.getMessage()]
    assert re.search(r"samples=\d+ p50_ms=[\d.]+ p99_ms=[\d.]+ max_ms=[\d.]+", line)
    assert watch.report().samples <= 1  # the window started again at the report


def test_an_idle_loop_is_sampled_less_often() -> None:
    # a period in which the loop's thread ran 1% of the time: idle, the long wait next;
    # 20%: working, the short one (stalls are sampled every 5 ms again)
    assert next_wait(0.005, 0.05, elapsed=0.05, cpu=0.0005) == 0.05
    assert next_wait(0.005, 0.05, elapsed=0.005, cpu=0.001) == 0.005
    assert LoopWatch(interval=0.005, idle_interval=0.001)._idle_interval == 0.005  # never below
