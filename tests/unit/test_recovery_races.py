"""The recovery pass under races and partial answers (service.usecases.recovery), with the
fakes of ``test_recovery_orphans``: twin replicas, silent live workers, a failed question."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from service.domain.catalog import Catalog
from service.domain.model import TaskState
from service.usecases.recovery import Recovery, RecoverySettings
from tests.unit.test_recovery_orphans import (
    LOST_AFTER,
    NODE,
    NOW,
    EmptyBroker,
    FakeBroker,
    FakeResults,
    FakeStore,
    WaitingStore,
    recovery,
    run,
)


def waiting_pass(store: WaitingStore, broker: FakeBroker) -> Recovery:
    """A pass over lost messages; NODE heartbeats, no task was reported on."""
    results = FakeResults({NODE})

    async def reported(task_ids: Collection[str]) -> set[str]:
        return set()

    results.reported = reported  # type: ignore[attr-defined]
    fakes: Any = (store, results, broker)
    return Recovery(fakes[0], fakes[1], fakes[2], Catalog({}), RecoverySettings(lost_after=LOST_AFTER))


async def test_a_replica_that_requeues_nothing_forgets_nothing() -> None:
    """Two replicas, one decision: the later one's requeue changes no row (the re-run its
    twin published already started elsewhere), so it must not delete that run's claim."""
    sleep = run("again", "demo.sleep", retries=1)
    store, results = FakeStore((sleep, 60)), FakeResults({NODE})
    rec = recovery(store, results, FakeBroker({NODE: set()}))
    store.rows["again"] = (run("again", "demo.sleep", retries=1, worker="celery@new"), NOW)
    await rec._lost_runs([sleep], NOW, NOW)  # decided on a stale read
    assert store.requeued == [] and results.forgotten == {}
    assert store.states["again"] is TaskState.RUNNING


async def test_a_replica_forgets_only_what_its_requeue_changed() -> None:
    store = FakeStore((run("a", "demo.sleep", retries=2), 60), (run("b", "demo.sleep"), 60))
    results = FakeResults({NODE})
    rec = recovery(store, results, FakeBroker({NODE: set()}))
    store.states["b"] = TaskState.QUEUED  # the twin replica requeued it a moment ago
    await rec._lost_runs([run("a", "demo.sleep", retries=2), run("b", "demo.sleep")], NOW, NOW)
    assert store.requeued == ["a"]
    assert results.forgotten == {"a": 2}


async def test_a_lost_message_is_not_republished_while_a_live_worker_is_silent() -> None:
    store, broker = WaitingStore("lost"), EmptyBroker({})  # NODE heartbeats, nobody answered
    rec = waiting_pass(store, broker)
    for _ in range(3):
        assert await rec.lost_messages(NOW) == []
    assert store.republished == []
    broker.replies = {NODE: set()}  # it answers: a suspect from before, decided now
    assert await rec.lost_messages(NOW) == ["lost"]


class FailingOnceBroker(EmptyBroker):
    """The first question to the workers fails (the broker blinked)."""

    failed = False

    async def answers(self, task_ids: Collection[str]) -> dict[str, set[str]] | None:
        if not self.failed:
            self.failed = True
            raise ConnectionError("blink")
        return await super().answers(task_ids)


async def test_a_failed_question_keeps_the_confirmed_suspects() -> None:
    """The pass that would confirm a lost message fails asking the workers: the next pass
    decides it (the documented bound), not two passes later."""
    store = WaitingStore("lost")
    rec = waiting_pass(store, FailingOnceBroker({NODE: set()}))
    assert await rec.lost_messages(NOW) == []  # first sight: a suspect, nobody asked
    try:
        await rec.lost_messages(NOW)
    except ConnectionError:
        pass
    else:
        raise AssertionError("the question should have failed")
    assert await rec.lost_messages(NOW) == ["lost"]
