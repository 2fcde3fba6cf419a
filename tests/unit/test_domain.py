"""The pure state rules of service.domain.model."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.domain.model import (
    Progress,
    TaskError,
    TaskRecord,
    TaskSpec,
    TaskState,
    TaskUpdate,
    apply_update,
    merge_updates,
)

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def record(**changes: Any) -> TaskRecord:
    base = TaskRecord(
        task_id="t1",
        task_name="demo.add",
        state=TaskState.QUEUED,
        create_time=T0,
        run_time=T0,
        update_time=T0,
    )
    return dataclasses.replace(base, **changes)


def update(state: TaskState, observed: float = 10, **fields: Any) -> TaskUpdate:
    return TaskUpdate(task_id="t1", state=state, observed_time=at(observed), **fields)


@pytest.mark.parametrize("state", list(TaskState))
def test_terminal(state: TaskState) -> None:
    expected = state in {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED}
    assert state.terminal is expected


SPEC = TaskSpec(
    task_name="demo.add",
    args=[1, 2],
    kwargs={"k": "v"},
    queue="q",
    request_id="r1",
    priority=3,
    countdown=5.0,
    run_time=at(60),
    expire_time=at(120),
    headers={"h": "x"},
)


def test_fingerprint_ignores_request_id() -> None:
    assert dataclasses.replace(SPEC, request_id="other").fingerprint() == SPEC.fingerprint()
    assert dataclasses.replace(SPEC).fingerprint() == SPEC.fingerprint()


@pytest.mark.parametrize(
    "changes",
    [
        {"task_name": "demo.sleep"},
        {"args": [1, 3]},
        {"kwargs": {"k": "w"}},
        {"queue": "other"},
        {"priority": 4},
        {"priority": None},
        {"countdown": 6.0},
        {"run_time": at(61)},
        {"run_time": None},
        {"expire_time": at(121)},
        {"headers": {"h": "y"}},
    ],
)
def test_fingerprint_differs_on_any_other_field(changes: dict[str, Any]) -> None:
    assert dataclasses.replace(SPEC, **changes).fingerprint() != SPEC.fingerprint()


def test_as_of_turns_due_scheduled_into_queued() -> None:
    scheduled = record(state=TaskState.SCHEDULED, run_time=at(60))
    assert scheduled.as_of(at(59)) is scheduled
    assert scheduled.as_of(at(60)).state is TaskState.QUEUED
    assert scheduled.as_of(at(61)) == dataclasses.replace(scheduled, state=TaskState.QUEUED)


@pytest.mark.parametrize("state", [s for s in TaskState if s is not TaskState.SCHEDULED])
def test_as_of_leaves_other_states(state: TaskState) -> None:
    rec = record(state=state, run_time=at(60))
    assert rec.as_of(at(120)) is rec


TERMINAL = [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED]


@pytest.mark.parametrize("state", TERMINAL)
def test_apply_update_never_changes_terminal(state: TaskState) -> None:
    done = record(state=state, end_time=at(5))
    assert apply_update(done, update(TaskState.RUNNING, start_time=at(10))) is done  # after the end
    assert apply_update(done, update(TaskState.SUCCEEDED, result=1)) is done
    error = TaskError("ValueError", "late")
    assert apply_update(done, update(TaskState.FAILED, 20, error=error, retries=3, end_time=at(20))) is done


@pytest.mark.parametrize("state", TERMINAL)
def test_late_start_moves_a_terminal_record_s_start_earlier(state: TaskState) -> None:
    done = record(state=state, start_time=at(5), end_time=at(5), update_time=at(6), result=3, retries=1)
    late = apply_update(done, update(TaskState.RUNNING, 30, start_time=at(2), retries=0, error=None))
    # the start not_after() filled in from the end gives way to the worker's own
    assert late == dataclasses.replace(done, start_time=at(2))
    assert late.update_time == at(6)  # a late fill-in is not a new change of state
    assert apply_update(late, update(TaskState.RUNNING, 40, start_time=at(3))) is late  # later: kept
    assert apply_update(late, update(TaskState.RUNNING, 40, start_time=at(2))) is late  # the same


def test_late_start_on_a_terminal_record_without_start() -> None:
    cancelled = record(state=TaskState.CANCELLED, end_time=at(5))
    assert apply_update(cancelled, update(TaskState.RUNNING, start_time=at(5))).start_time == at(5)
    assert apply_update(cancelled, update(TaskState.RUNNING, start_time=at(6))) is cancelled


def test_late_start_on_a_terminal_record_without_end() -> None:
    done = record(state=TaskState.SUCCEEDED, start_time=at(5))
    assert apply_update(done, update(TaskState.RUNNING, start_time=at(4))).start_time == at(4)


@pytest.mark.parametrize("state", TERMINAL)
def test_late_progress_fills_a_terminal_record_in_when_further(state: TaskState) -> None:
    done = record(state=state, start_time=at(1), end_time=at(5), progress=Progress(29, 30, "29"))
    final = apply_update(done, update(TaskState.RUNNING, 30, progress=Progress(30, 30, "30")))
    assert final == dataclasses.replace(done, progress=Progress(30, 30, "30"))
    for stale in (Progress(29, 30, "again"), Progress(28, 30), Progress(29, 40, "new total")):
        assert apply_update(done, update(TaskState.RUNNING, 30, progress=stale)) is done  # ties keep
    assert apply_update(done, update(TaskState.RUNNING, 30, progress=Progress(31, 40))).progress == Progress(
        31, 40
    )


def test_late_progress_fills_a_terminal_record_without_progress() -> None:
    done = record(state=TaskState.SUCCEEDED, start_time=at(1), end_time=at(5))
    late = update(TaskState.RUNNING, 30, progress=Progress(0, 3), start_time=at(0))
    assert apply_update(done, late) == dataclasses.replace(done, progress=Progress(0, 3), start_time=at(0))


def test_success_before_started_ends_with_the_worker_s_start() -> None:
    """The race the gateway lives with: SUCCESS recorded before its STARTED."""
    queued = record()
    done = apply_update(queued, update(TaskState.SUCCEEDED, 10, result=3, end_time=at(9)))
    assert done.start_time == done.end_time == at(9)  # not_after(): no start known yet
    started = apply_update(done, update(TaskState.RUNNING, 11, start_time=at(8)))
    assert (started.start_time, started.end_time, started.state) == (at(8), at(9), TaskState.SUCCEEDED)


def test_apply_update_sets_start_time_once() -> None:
    started = apply_update(record(), update(TaskState.RUNNING, 10, start_time=at(10)))
    assert started.state is TaskState.RUNNING
    assert started.start_time == at(10)
    assert started.update_time == at(10)
    again = apply_update(started, update(TaskState.RUNNING, 20, start_time=at(20), progress=Progress(1, 2)))
    assert again.start_time == at(10)
    assert again.progress == Progress(1, 2)


def test_apply_update_success_sets_result_and_end_time() -> None:
    done = apply_update(record(state=TaskState.RUNNING), update(TaskState.SUCCEEDED, 30, result={"x": 1}))
    assert done.state is TaskState.SUCCEEDED
    assert done.result == {"x": 1}
    assert done.end_time == at(30)


def test_apply_update_end_time_prefers_update_end_time() -> None:
    error = TaskError(type="ValueError", message="boom")
    failed = apply_update(record(), update(TaskState.FAILED, 30, error=error, end_time=at(25)))
    assert failed.end_time == at(25)
    assert failed.error == error
    assert failed.result is None


def test_apply_update_non_terminal_sets_no_end_time() -> None:
    assert apply_update(record(), update(TaskState.RETRYING, retries=1)).end_time is None


def test_apply_update_keeps_progress_when_update_has_none() -> None:
    running = record(state=TaskState.RUNNING, progress=Progress(3, 10, "step"), start_time=at(1))
    after = apply_update(running, update(TaskState.RETRYING, 20, retries=1))
    assert after.progress == Progress(3, 10, "step")
    assert after.retries == 1


def test_apply_update_returns_same_object_when_only_update_time_differs() -> None:
    running = record(state=TaskState.RUNNING, progress=Progress(1, 2), start_time=at(1))
    same = update(TaskState.RUNNING, 50, progress=Progress(1, 2), start_time=at(50))
    assert apply_update(running, same) is running


def test_merge_keeps_terminal_older_over_non_terminal_newer() -> None:
    older = update(TaskState.SUCCEEDED, 10, result=3)
    assert merge_updates(older, update(TaskState.RUNNING, 20, start_time=at(20))) is older  # after the end
    assert merge_updates(older, update(TaskState.RUNNING, 20, retries=2)) is older


def test_merge_of_terminal_older_takes_newer_earlier_start_and_further_progress() -> None:
    older = update(TaskState.SUCCEEDED, 10, result=3, end_time=at(9))
    newer = update(TaskState.RUNNING, 20, start_time=at(8), progress=Progress(30, 30), retries=1)
    merged = merge_updates(older, newer)
    assert merged == dataclasses.replace(older, start_time=at(8), progress=Progress(30, 30))
    behind = update(TaskState.RUNNING, 30, start_time=at(8.5), progress=Progress(29, 30))
    assert merge_updates(merged, behind) is merged
    error = TaskError("ValueError", "boom")
    failed = update(TaskState.FAILED, 10, error=error, progress=Progress(1, 2), start_time=at(3))
    assert merge_updates(failed, newer) == dataclasses.replace(failed, progress=Progress(30, 30))


def test_merge_takes_newer_terminal() -> None:
    older = update(TaskState.RUNNING, 10, start_time=at(10))
    merged = merge_updates(older, update(TaskState.SUCCEEDED, 20, result=3))
    assert merged.state is TaskState.SUCCEEDED
    assert merged.result == 3
    assert merged.observed_time == at(20)


def test_merge_keeps_earliest_start_time() -> None:
    older = update(TaskState.RUNNING, 10, start_time=at(10))
    newer = update(TaskState.RUNNING, 20, start_time=at(20))
    assert merge_updates(older, newer).start_time == at(10)
    assert merge_updates(update(TaskState.RETRYING, 5), newer).start_time == at(20)


def test_merge_keeps_older_progress_and_retries_when_newer_has_none() -> None:
    older = update(TaskState.RUNNING, 10, progress=Progress(1, 5), retries=2)
    merged = merge_updates(older, update(TaskState.RUNNING, 20))
    assert merged.progress == Progress(1, 5)
    assert merged.retries == 2
    newest = merge_updates(older, update(TaskState.RUNNING, 30, progress=Progress(2, 5), retries=3))
    assert newest.progress == Progress(2, 5)
    assert newest.retries == 3
