"""Following a workflow for StreamWorkflow on the process's shared subscription.

A stream registers ONE inbox of the hub (``ProgressHub.register_many``) for every step of
its workflow: a quiet stream costs no query, no timer of its own beyond the lifetime's and
the slow fallback poll, and no Redis connection. The database stays the truth (the
recorder writes every state, and the workflow's own rules run on a read): an update of a
step only says "read again". The read waits ``COALESCE`` seconds first (and keeps
``MIN_READ_GAP`` seconds from the previous read), so a burst of 500 step updates costs
one read.

The recorder writes an update within its flush interval, so a read can come before it.
The stream keeps the latest update of each step until a read shows it, asking the
database again every ``CATCH_UP`` seconds (one cheap version query each) for at most
``CATCH_UP_READS`` times. Changes that reach the database without a message on the
subscription (another replica's workflow loop, a cancel there) are seen by the fallback
poll every ``FALLBACK_POLL`` seconds; this process's own cancels and workflow loop wake
the streams at once (``Wakeups``).

    step update ─► hub ─► inbox ─┐              ┌─► database read ─► view ─► stream
    RESYNC / cancel here ────────┼─► coalesce ──┤
    every FALLBACK_POLL s ───────┘ (version?)   └─ update not in the database yet: CATCH_UP
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

from service.domain.errors import LimitExceeded, ShuttingDown
from service.domain.model import TaskRecord, TaskState, TaskUpdate, apply_update
from service.results.hub import Inbox, Signal

#: Seconds from a step's update to the read it causes (updates meanwhile join it).
COALESCE = 0.05
#: Seconds at least between two reads caused by updates (never more reads than a poll).
MIN_READ_GAP = 0.25
#: Seconds between two version checks while an update is not in the database yet.
CATCH_UP = 0.1
#: Version checks for an update not in the database yet before leaving it to the fallback.
CATCH_UP_READS = 20
#: Seconds between two fallback version checks (for changes no message announces).
FALLBACK_POLL = 5.0
#: Seconds between two version checks of a stream with no subscription at all.
NO_HUB_POLL = 0.25


class SubscriptionPort(Protocol):
    """The shared subscription (``service.results.hub.ProgressHub``)."""

    def register_many(self, task_ids: Iterable[str]) -> Inbox:
        """One inbox for the updates of every task in ``task_ids``."""
        ...

    def unregister_many(self, task_ids: Iterable[str], inbox: Inbox) -> None:
        """Stop delivering them to ``inbox``."""
        ...


class View(Protocol):
    """What a stream yields (``WorkflowView``)."""

    @property
    def state(self) -> TaskState:
        """The workflow's state."""
        ...

    @property
    def tasks(self) -> list[TaskRecord]:
        """Its steps."""
        ...


V = TypeVar("V", bound=View)


class Wakeups:
    """The inboxes of the workflows this process streams, to wake them when this process
    changes a workflow with no message on the subscription (a cancel, steps the workflow
    loop ended)."""

    def __init__(self) -> None:
        self._inboxes: dict[str, list[Inbox]] = {}

    def add(self, workflow_id: str, inbox: Inbox) -> None:
        """Wake ``inbox`` on changes of ``workflow_id``."""
        self._inboxes.setdefault(workflow_id, []).append(inbox)

    def remove(self, workflow_id: str, inbox: Inbox) -> None:
        """Stop waking ``inbox``."""
        boxes = self._inboxes.get(workflow_id)
        if boxes is not None and inbox in boxes:
            boxes.remove(inbox)
            if not boxes:
                del self._inboxes[workflow_id]

    def wake(self, workflow_id: str) -> None:
        """Have every stream of ``workflow_id`` read it again."""
        for inbox in self._inboxes.get(workflow_id, ()):
            inbox.put(Signal.RESYNC)


async def follow(
    hub: SubscriptionPort | None,
    wakeups: Wakeups,
    workflow_id: str,
    task_ids: list[str],
    read: Callable[[], Awaitable[V]],
    version: Callable[[], Awaitable[object]],
    lifetime: float | None,
) -> AsyncGenerator[V, None]:
    """``read()``'s view, then one per change, ending after a terminal state.

    Raises:
        ShuttingDown: the server is stopping.
        LimitExceeded: ``lifetime`` seconds are over.
    """
    inbox = Inbox() if hub is None else hub.register_many(task_ids)
    wakeups.add(workflow_id, inbox)
    loop = asyncio.get_running_loop()
    expiry = None if lifetime is None else loop.call_later(lifetime, inbox.put, Signal.EXPIRED)
    pending: dict[str, TaskUpdate] = {}  # updates not seen in the database yet
    checks = 0  # version checks since the last update arrived
    try:
        seen = await version()  # registered and versioned before the read: nothing missed
        last = await read()
        read_at = loop.time()
        yield last
        while not last.state.terminal:
            if pending and checks >= CATCH_UP_READS:
                pending.clear()  # not in the database yet: left to the fallback poll
            poll = NO_HUB_POLL if hub is None else FALLBACK_POLL
            item = await inbox.get(timeout=CATCH_UP if pending else poll)
            if item is None:
                checks += 1
                current_version = await version()
                if current_version is not None and current_version == seen:
                    continue
                seen = current_version
            else:
                await asyncio.sleep(max(COALESCE, read_at + MIN_READ_GAP - loop.time()))
                for got in (item, *inbox.drain()):
                    _check_end(got, lifetime)
                    if isinstance(got, TaskUpdate):
                        pending[got.task_id] = got
                        checks = 0
            current = await read()
            read_at = loop.time()
            _settle(pending, current.tasks)
            if current != last:
                yield current
                last = current
    finally:
        if expiry is not None:
            expiry.cancel()
        wakeups.remove(workflow_id, inbox)
        if hub is not None:
            hub.unregister_many(task_ids, inbox)


def _check_end(item: TaskUpdate | Signal, lifetime: float | None) -> None:
    if item is Signal.SHUTDOWN:
        raise ShuttingDown("the server is shutting down; call StreamWorkflow again")
    if item is Signal.EXPIRED:
        raise LimitExceeded(
            f"stream lifetime limit reached: {lifetime:g} s (TASKGATE_STREAM_LIFETIME); "
            "call StreamWorkflow again"
        )


def _settle(pending: dict[str, TaskUpdate], tasks: list[TaskRecord]) -> None:
    """Forget the updates the database shows (or that no longer change its step)."""
    if not pending:
        return
    for task in tasks:
        update = pending.get(task.task_id)
        if update is not None and apply_update(task, update) == task:
            del pending[task.task_id]
