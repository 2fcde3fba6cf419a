"""Group commit: many concurrent callers, one database round trip.

The first caller to arrive starts a flush right away; whoever arrives while a flush is in
flight joins the next one. At low load a call costs one round trip as before; under load
the batches grow by themselves, with no timer and no added latency.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Coalesces concurrent ``submit`` calls into calls of ``flush`` on whole batches.

    Every submitter of a batch gets the batch's outcome: its return, or its exception.
    """

    def __init__(self, flush: Callable[[Sequence[T]], Awaitable[None]], *, max_batch: int = 500) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._waiting: collections.deque[tuple[T, asyncio.Future[None]]] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Add ``item`` to the next batch and wait until that batch is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._drain(), name="taskgate-group-commit")
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._waiting:
            size = min(self._max_batch, len(self._waiting))
            batch = [self._waiting.popleft() for _ in range(size)]
            try:
                await self._flush([item for item, _ in batch])
            except BaseException as exc:  # every waiter gets the outcome, even cancellation
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
