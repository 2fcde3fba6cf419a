"""The recovery pass's decision on RUNNING tasks a live worker no longer holds
(service.usecases.recovery.Recovery.lost_runs), with fakes of its ports.

A run is declared lost only when its worker heartbeats, answered ``query_task`` without
holding it (nor did any other worker), on two passes in a row, with the state feed read up
to the first of them, and with no result document and no finished run claim in Redis.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from service.domain.catalog import Catalog
from service.domain.model import TaskError, TaskState, TaskUpdate
from service.results.recovery import StoredResult, StreamId
from service.store.recovery import LostCandidate, StaleRun
from service.usecases.recovery import WORKER_LOST, Recovery, RecoverySettings

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NODE = "celery@live"
LOST_AFTER = 30.0


class FakeStore:
    """RUNNING rows by task id: (run, last update); records what the pass wrote."""

    def __init__(self, *runs: tuple[StaleRun, float]) -> None:
        self.rows = {run.task_id: (run, NOW - dt.timedelta(seconds=age)) for run, age in runs}
        self.states = {run.task_id: TaskState.RUNNING for run, _ in runs}
        self.requeued: list[str] = []
        self.failed: list[tuple[str, TaskError]] = []
        self.settled: list[TaskUpdate] = []

    async def stale_running(self, updated_before: dt.datetime, limit: int) -> list[StaleRun]:
        return [
            run
            for task_id, (run, updated) in sorted(self.rows.items())
            if self.states[task_id] is TaskState.RUNNING and updated <= updated_before
        ][:limit]

    async def requeue(
        self,
        task_ids: Iterable[str],
        worker: str,
        now: dt.datetime,
        updated_before: dt.datetime | None = None,
    ) -> list[str]:
        changed = [task_id for task_id in task_ids if self._still(task_id, worker, updated_before)]
        for task_id in changed:
            self.states[task_id] = TaskState.QUEUED
        self.requeued += changed
        return sorted(changed)

    async def fail(
        self,
        task_ids: Iterable[str],
        worker: str,
        error: TaskError,
        now: dt.datetime,
        updated_before: dt.datetime | None = None,
    ) -> int:
        changed = [task_id for task_id in task_ids if self._still(task_id, worker, updated_before)]
        for task_id in changed:
            self.states[task_id] = TaskState.FAILED
            self.failed.append((task_id, error))
        return len(changed)

    async def settle(self, updates: Iterable[TaskUpdate]) -> int:
        items = list(updates)
        for update in items:
            self.states[update.task_id] = update.state
        self.settled += items
        return len(items)

    def _still(self, task_id: str, worker: str, updated_before: dt.datetime | None) -> bool:
        run, updated = self.rows[task_id]
        fresh = updated_before is not None and updated > updated_before
        return self.states[task_id] is TaskState.RUNNING and run.worker == worker and not fresh


class FakeResults:
    """Heartbeats, stored documents, run claims and the state feed, as the test sets them."""

    def __init__(self, alive: set[str]) -> None:
        self.heartbeats = alive
        self.stored: dict[str, StoredResult] = {}
        self.done: set[str] = set()
        self.feed_ok = True
        self.marks_asked: list[StreamId | None] = []
        self.forgotten: dict[str, int] = {}
        self.announced: list[str] = []
        self.republished: list[str] = []

    async def alive(self, hostnames: Collection[str]) -> set[str]:
        return set(hostnames) & self.heartbeats

    async def results(self, task_ids: Collection[str]) -> dict[str, StoredResult]:
        return {task_id: item for task_id, item in self.stored.items() if task_id in task_ids}

    async def republish(self, stored: Iterable[StoredResult]) -> None:
        self.republished += [item.update.task_id for item in stored]

    async def finished_claims(self, runs: Mapping[str, int]) -> set[str]:
        return set(runs) & self.done

    async def forget_runs(self, runs: Mapping[str, int]) -> None:
        self.forgotten.update(runs)

    async def feed_mark(self) -> StreamId | None:
        return (1, 0)

    async def feed_settled(self, mark: StreamId | None) -> bool:
        self.marks_asked.append(mark)
        return self.feed_ok

    async def announce_failed(self, task_ids: Collection[str], error: TaskError, now: dt.datetime) -> None:
        self.announced += list(task_ids)

    async def aclose(self) -> None:
        pass


class FakeBroker:
    """What each answering worker holds; None: nobody could be asked."""

    def __init__(self, answers: dict[str, set[str]] | None) -> None:
        self.replies = answers
        self.asked: list[set[str]] = []

    async def answers(self, task_ids: Collection[str]) -> dict[str, set[str]] | None:
        self.asked.append(set(task_ids))
        if self.replies is None:
            return None
        return {node: held & set(task_ids) for node, held in self.replies.items()}

    async def aclose(self) -> None:
        pass


def run(task_id: str, name: str = "demo.add", worker: str = NODE, retries: int = 0) -> StaleRun:
    return StaleRun(task_id, name, "jobs", worker, retries)


def recovery(store: FakeStore, results: FakeResults, broker: FakeBroker) -> Recovery:
    catalog = Catalog({"demo.add": None, "demo.sleep": None}, acks_late=["demo.sleep"])
    settings = RecoverySettings(interval=1, lost_after=LOST_AFTER)
    fakes: Any = (store, results, broker)
    return Recovery(fakes[0], fakes[1], fakes[2], catalog, settings)


async def passes(rec: Recovery, count: int) -> list[list[str]]:
    return [await rec.lost_runs(NOW) for _ in range(count)]


async def test_a_run_its_live_worker_no_longer_holds_ends_failed_worker_lost_on_the_second_pass() -> None:
    store = FakeStore((run("gone"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    rec = recovery(store, results, broker)
    assert await passes(rec, 3) == [[], ["gone"], []]  # first sight: a suspect; then once
    assert store.states["gone"] is TaskState.FAILED
    [(task_id, error)] = store.failed
    assert task_id == "gone"
    assert error.type == WORKER_LOST
    assert NODE in error.message
    assert "no longer holds" in error.message
    assert "no result was stored" in error.message
    assert results.announced == ["gone"]  # the FAILURE document, for streams and replicas
    assert store.requeued == []


async def test_an_opted_in_run_is_republished_with_its_leftovers_forgotten() -> None:
    store = FakeStore((run("again", "demo.sleep", retries=2), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    rec = recovery(store, results, broker)
    assert await passes(rec, 2) == [[], ["again"]]
    assert store.requeued == ["again"]
    assert store.states["again"] is TaskState.QUEUED
    assert results.forgotten == {"again": 2}  # result document and run claim of attempt 2
    assert store.failed == [] and results.announced == []


async def test_a_long_run_its_live_worker_holds_is_never_touched() -> None:
    store = FakeStore((run("long", "demo.sleep"), 3600), (run("long2"), 3600))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: {"long", "long2"}})
    rec = recovery(store, results, broker)
    assert await passes(rec, 5) == [[]] * 5
    assert broker.asked == [{"long", "long2"}] * 5
    assert store.requeued == [] and store.failed == [] and store.settled == []
    assert results.forgotten == {} and results.announced == []
    assert store.states == {"long": TaskState.RUNNING, "long2": TaskState.RUNNING}


async def test_a_run_another_live_worker_holds_is_left_alone() -> None:
    store = FakeStore((run("moved"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set(), "celery@other": {"moved"}})
    rec = recovery(store, results, broker)
    assert await passes(rec, 3) == [[]] * 3
    assert store.states["moved"] is TaskState.RUNNING


async def test_a_worker_that_does_not_answer_decides_nothing() -> None:
    store = FakeStore((run("stalled"), 60))
    results = FakeResults({NODE})
    broker = FakeBroker({"celery@other": set()})  # its own worker is busy, not answering
    rec = recovery(store, results, broker)
    assert await passes(rec, 3) == [[]] * 3
    broker.replies = None  # nobody could be asked at all
    assert await passes(rec, 3) == [[]] * 3
    assert store.states["stalled"] is TaskState.RUNNING


async def test_a_missing_answer_between_two_passes_restarts_the_count() -> None:
    store = FakeStore((run("gone"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    rec = recovery(store, results, broker)
    assert await rec.lost_runs(NOW) == []
    broker.replies = None
    assert await rec.lost_runs(NOW) == []
    broker.replies = {NODE: set()}
    assert await passes(rec, 2) == [[], ["gone"]]


async def test_a_worker_that_takes_it_between_passes_clears_the_suspicion() -> None:
    store = FakeStore((run("gone"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    rec = recovery(store, results, broker)
    assert await rec.lost_runs(NOW) == []
    broker.replies = {NODE: {"gone"}}
    assert await rec.lost_runs(NOW) == []
    broker.replies = {NODE: set()}
    assert await passes(rec, 2) == [[], ["gone"]]


async def test_a_recent_run_or_one_on_a_silent_worker_is_not_this_paths() -> None:
    store = FakeStore((run("recent"), LOST_AFTER / 2), (run("silent", worker="celery@dead"), 600))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set(), "celery@dead": set()})
    rec = recovery(store, results, broker)
    assert await passes(rec, 3) == [[]] * 3
    assert broker.asked == []  # nothing stale on a heartbeating worker: nobody asked
    assert store.states == {"recent": TaskState.RUNNING, "silent": TaskState.RUNNING}


async def test_a_stored_result_is_applied_not_overwritten() -> None:
    store = FakeStore((run("done"), 60), (run("retrying"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    success = TaskUpdate("done", TaskState.SUCCEEDED, NOW, result=3)
    retry = TaskUpdate("retrying", TaskState.RETRYING, NOW, error=TaskError("Retry", "again"), retries=1)
    results.stored = {"done": StoredResult(success, b"{}"), "retrying": StoredResult(retry, b"{}")}
    rec = recovery(store, results, broker)
    assert await passes(rec, 3) == [[]] * 3
    assert store.settled == [success, retry]  # applied once: the rows are no longer RUNNING
    assert sorted(results.republished) == ["done", "retrying"]
    assert store.states == {"done": TaskState.SUCCEEDED, "retrying": TaskState.RETRYING}
    assert store.failed == [] and results.announced == []


async def test_a_leftover_started_document_is_no_result() -> None:
    store = FakeStore((run("gone"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    started = TaskUpdate("gone", TaskState.RUNNING, NOW, worker=NODE)
    results.stored = {"gone": StoredResult(started, b"{}")}
    rec = recovery(store, results, broker)
    assert await passes(rec, 2) == [[], ["gone"]]
    assert store.settled == []
    assert store.states["gone"] is TaskState.FAILED


async def test_a_run_whose_claim_is_done_is_not_declared_lost() -> None:
    store = FakeStore((run("ended"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    results.done = {"ended"}
    rec = recovery(store, results, broker)
    assert await passes(rec, 3) == [[]] * 3
    assert store.states["ended"] is TaskState.RUNNING


async def test_nothing_is_decided_until_the_state_feed_is_read_up_to_the_first_pass() -> None:
    store = FakeStore((run("gone"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    results.feed_ok = False
    rec = recovery(store, results, broker)
    assert await passes(rec, 3) == [[]] * 3
    assert results.marks_asked == [(1, 0), (1, 0)]  # asked from the second pass on
    results.feed_ok = True
    assert await rec.lost_runs(NOW) == ["gone"]


async def test_a_run_updated_between_the_read_and_the_write_is_kept() -> None:
    store = FakeStore((run("alive"), 60))
    results, broker = FakeResults({NODE}), FakeBroker({NODE: set()})
    rec = recovery(store, results, broker)
    assert await rec.lost_runs(NOW) == []
    original = store.stale_running

    async def stale_then_updated(updated_before: dt.datetime, limit: int) -> list[StaleRun]:
        found = await original(updated_before, limit)
        store.rows["alive"] = (store.rows["alive"][0], NOW)  # a progress lands meanwhile
        return found

    store.stale_running = stale_then_updated  # type: ignore[method-assign]
    await rec.lost_runs(NOW)
    assert store.states["alive"] is TaskState.RUNNING
    assert store.failed == [] and results.announced == []


class WaitingStore:
    """QUEUED tasks published long ago (``waiting``); records the republished ones."""

    def __init__(self, *task_ids: str) -> None:
        self.waiting_ids = list(task_ids)
        self.republished: list[str] = []

    async def waiting(self, published_before: dt.datetime, limit: int) -> list[LostCandidate]:
        return [LostCandidate(task_id, "demo.add", "jobs") for task_id in self.waiting_ids]

    async def republish(
        self, task_ids: Iterable[str], published_before: dt.datetime, now: dt.datetime
    ) -> int:
        self.republished += list(task_ids)
        return len(self.republished)

    async def known_workers(self) -> set[str]:
        return {NODE}


class EmptyBroker(FakeBroker):
    """A broker that holds no message (Redis restarted empty)."""

    async def held(self, queues: Iterable[str], wanted: Collection[str]) -> set[str] | None:
        return set()

    async def holders(self, task_ids: Collection[str]) -> set[str] | None:
        answers = await self.answers(task_ids)
        return None if answers is None else set().union(*answers.values())


async def test_a_lost_message_whose_task_a_live_worker_runs_is_not_republished() -> None:
    """Its STARTED went with Redis: the record says QUEUED, the broker has no message, but a
    worker runs it; a second publish would run it twice."""
    store, broker = WaitingStore("running", "lost"), EmptyBroker({NODE: {"running"}})
    results = FakeResults({NODE})

    async def reported(task_ids: Collection[str]) -> set[str]:
        return set()

    results.reported = reported  # type: ignore[attr-defined]
    fakes: Any = (store, results, broker)
    rec = Recovery(fakes[0], fakes[1], fakes[2], Catalog({}), RecoverySettings(lost_after=LOST_AFTER))
    assert await rec.lost_messages(NOW) == []
    assert await rec.lost_messages(NOW) == ["lost"]
    assert store.republished == ["lost"]
