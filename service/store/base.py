"""The store port: what the use cases, the outbox and the recorder ask of the task store.

``TaskStore`` (PostgreSQL, and SQLite for ``taskgate dev``) implements it; the contract
tests in ``tests/store`` hold every implementation to it. Its errors are the domain's
``DatabaseUnavailable`` (retry later) and ``RequestIdConflict``, and the store's
``StatementRejected`` (the database refused one statement).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

from service.domain.model import Delivery, TaskRecord, TaskUpdate
from service.store.rows import NewTask


class ActiveKey(NamedTuple):
    """Where an unfinished task stands in the reconcile's order (``active_page``'s keyset)."""

    #: When the task's record last changed.
    update_time: dt.datetime
    #: The task; breaks ties between equal ``update_time`` values.
    task_id: str


class TaskStorePort(Protocol):
    """The durable record of tasks, and the outbox of what is still to be published."""

    async def ping(self) -> None:
        """Raise ``DatabaseUnavailable`` unless the database answers."""

    async def close(self) -> None:
        """Release every connection."""

    async def insert(self, new: NewTask) -> TaskRecord | None:
        """Record a new task; the original's record for a repeated request_id, else None."""

    async def insert_batch(self, news: Sequence[NewTask], *, request_id: str = "") -> list[TaskRecord] | None:
        """Record tasks all or none; the originals' records for a repeated batch, else None."""

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task with this id, or None."""

    async def apply_updates(self, updates: Iterable[TaskUpdate]) -> int:
        """Write state changes by the domain's transition rule; returns rows changed."""

    async def claim_due(self, now: dt.datetime, *, lease: dt.timedelta, limit: int) -> list[Delivery]:
        """Lease up to ``limit`` tasks due for publishing (rows locked by others skipped)."""

    async def mark_published(self, task_ids: Sequence[str], now: dt.datetime) -> None:
        """Clear the outbox mark of tasks the broker accepted."""

    async def retry_publish_at(self, task_ids: Sequence[str], when: dt.datetime) -> None:
        """Put still-marked tasks back in the outbox, due at ``when``."""

    async def active_ids(self, limit: int) -> list[str]:
        """Ids of published, unfinished tasks, least recently updated first."""

    async def active_page(
        self, after: ActiveKey | None, limit: int, *, updated_before: dt.datetime
    ) -> list[ActiveKey]:
        """Up to ``limit`` published, unfinished tasks last updated no later than
        ``updated_before``, in ``(update_time, task_id)`` order, after ``after`` (None: from
        the first); pass the last key of a page to get the next."""
