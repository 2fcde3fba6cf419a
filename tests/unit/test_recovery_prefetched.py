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


class FakeBroker:
    """Unacked entries by task id, and the tasks the live workers say they hold."""

    def __init__(self, taken: dict[str, float], holding: set[str] | None = None) -> None:
        self.entries = {task_id: Taken(f"tag-{task_id}", b"[]", when) for task_id, when in taken.items()}
        #: what the live workers answer; None: no answer could be had
        self.holding: set[str] | None = set() if holding is None else holding
        self.restored: list[tuple[str, str]] = []
        self.asked: list[set[str]] = []

    async def held(self, queues: Iterable[str], wanted: Collection[str]) -> set[str] | None:
        return set(wanted) & set(self.entries)

    async def taken(self, wanted: Collection[str], before: float) -> dict[str, Taken] | None:
        return {tid: t for tid, t in self.entries.items() if tid in wanted and t.taken_at < before}

    async def holders(self, task_ids: Collection[str]) -> set[str] | None:
        self.asked.append(set(task_ids))
        return None if self.holding is None else set(task_ids) & self.holding

    async def restore(self, taken: Taken, queue: str) -> bool:
        task_id = taken.tag.removeprefix("tag-")
        if self.entries.pop(task_id, None) is None:
            return False
        self.restored.append((task_id, queue))
        return True

    async def aclose(self) -> None:
        pass


def recovery(broker: FakeBroker) -> Recovery:
    unused: Any = object()
    return Recovery(unused, unused, broker, Catalog({}), RecoverySettings(interval=1, lost_after=30))


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
