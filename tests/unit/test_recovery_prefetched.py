"""The recovery pass's decision on prefetched messages (service.usecases.recovery.Recovery.orphaned):
restored only when taken long ago and held by no live worker on two passes in a row."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable
from typing import Any

from service.broker.inspect import Taken
from service.domain.catalog import Catalog
from service.usecases.recovery import Recovery, RecoverySettings

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
#: the live worker (heartbeating, known to the workers table)
LIVE = "celery@live"


class FakeBroker:
    """Unacked entries by task id, and the tasks the live workers say they hold."""

    def __init__(self, taken: dict[str, float], holding: set[str] | None = None) -> None:
        self.entries = {task_id: Taken(f"tag-{task_id}", b"[]", when) for task_id, when in taken.items()}
        #: what the live worker holds; None: no answer could be had at all
        self.holding: set[str] | None = set() if holding is None else holding
        #: the workers that answer in time
        self.answering = {LIVE}
        self.restored: list[tuple[str, str]] = []
        self.asked: list[set[str]] = []

    async def held(self, queues: Iterable[str], wanted: Collection[str]) -> set[str] | None:
        return set(wanted) & set(self.entries)

    async def taken(self, wanted: Collection[str], before: float) -> dict[str, Taken] | None:
        return {tid: t for tid, t in self.entries.items() if tid in wanted and t.taken_at < before}

    async def answers(self, task_ids: Collection[str]) -> dict[str, set[str]] | None:
        self.asked.append(set(task_ids))
        if self.holding is None:
            return None
        return {node: set(task_ids) & self.holding for node in self.answering}

    async def restore(self, taken: Taken, queue: str) -> bool:
        task_id = taken.tag.removeprefix("tag-")
        if self.entries.pop(task_id, None) is None:
            return False
        self.restored.append((task_id, queue))
        return True

    async def aclose(self) -> None:
        pass


class FakeWorkers:
    """The workers table (``known_workers``) and their heartbeats (``alive``)."""

    def __init__(self) -> None:
        self.known = {LIVE, "celery@dead"}
        self.heartbeating = {LIVE}

    async def known_workers(self) -> set[str]:
        return set(self.known)

    async def alive(self, hostnames: Collection[str]) -> set[str]:
        return set(hostnames) & self.heartbeating


def recovery(broker: FakeBroker, workers: FakeWorkers | None = None) -> Recovery:
    fake: Any = workers or FakeWorkers()
    return Recovery(fake, fake, broker, Catalog({}), RecoverySettings(interval=1, lost_after=30))


def ago(seconds: float) -> float:
    return (NOW - dt.timedelta(seconds=seconds)).timestamp()


QUEUES = {"old": "jobs", "fresh": "jobs", "live": "jobs"}


async def test_an_old_message_no_worker_holds_is_restored_on_the_second_pass() -> None:
    broker = FakeBroker({"old": ago(60), "fresh": ago(5)})
    rec = recovery(broker)
    assert await rec.orphaned({"old", "fresh"}, QUEUES, NOW) == []  # first sight: a suspect
    assert broker.asked == [{"old"}]  # only the message taken before the bound is asked about
    assert await rec.orphaned({"old", "fresh"}, QUEUES, NOW) == ["old"]
    assert broker.restored == [("old", "jobs")]
    assert await rec.orphaned({"old", "fresh"}, QUEUES, NOW) == []  # nothing twice


async def test_a_message_a_live_worker_holds_is_left_alone() -> None:
    broker = FakeBroker({"live": ago(600)}, holding={"live"})
    rec = recovery(broker)
    for _ in range(3):
        assert await rec.orphaned({"live"}, QUEUES, NOW) == []
    assert broker.restored == []


async def test_a_worker_that_takes_it_between_passes_clears_the_suspicion() -> None:
    broker = FakeBroker({"old": ago(60)})
    rec = recovery(broker)
    assert await rec.orphaned({"old"}, QUEUES, NOW) == []
    broker.holding = {"old"}  # a live worker answered this time
    assert await rec.orphaned({"old"}, QUEUES, NOW) == []
    broker.holding = set()
    assert await rec.orphaned({"old"}, QUEUES, NOW) == []  # a suspect again, not yet confirmed
    assert await rec.orphaned({"old"}, QUEUES, NOW) == ["old"]


async def test_no_answer_about_the_workers_decides_nothing() -> None:
    broker = FakeBroker({"old": ago(60)})
    broker.holding = None
    rec = recovery(broker)
    for _ in range(3):
        assert await rec.orphaned({"old"}, QUEUES, NOW) == []
    assert broker.restored == []


async def test_nobody_answering_is_not_nobody_holding() -> None:
    """The live worker holds the message but does not answer within the broadcast's
    timeout (loaded): its silence decides nothing, on any number of passes."""
    broker = FakeBroker({"old": ago(600)}, holding={"old"})
    broker.answering = set()  # answers {}
    rec = recovery(broker)
    for _ in range(4):
        assert await rec.orphaned({"old"}, QUEUES, NOW) == []
    assert broker.restored == []


async def test_a_silent_pass_restarts_the_count() -> None:
    broker = FakeBroker({"old": ago(600)})
    rec = recovery(broker)
    assert await rec.orphaned({"old"}, QUEUES, NOW) == []  # a suspect
    broker.answering = set()
    assert await rec.orphaned({"old"}, QUEUES, NOW) == []  # nothing decided, suspicion dropped
    broker.answering = {LIVE}
    assert await rec.orphaned({"old"}, QUEUES, NOW) == []
    assert await rec.orphaned({"old"}, QUEUES, NOW) == ["old"]


async def test_a_dead_workers_silence_does_not_hold_anything_up() -> None:
    """Only workers with a fresh heartbeat must answer: the dead one (in the workers table,
    heartbeat expired) that took the message is not waited for."""
    broker = FakeBroker({"old": ago(600)})
    workers = FakeWorkers()
    rec = recovery(broker, workers)
    assert [await rec.orphaned({"old"}, QUEUES, NOW) for _ in range(2)] == [[], ["old"]]
