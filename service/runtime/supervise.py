"""One way to run a background loop: log every failure, back off (bounded), go on.

Every loop of a gateway process (the shared subscription, the recorder, the reconcile, the
outbox, health, the loop watch, the GC policy) runs as ``supervise(name, step)`` inside one
:class:`Supervisor`, which starts them together and cancels them together.

``step`` is one round of the loop. It returns how many seconds to wait before the next round
(``None`` or 0: go on at once). When it raises:

- :class:`~service.domain.errors.Unavailable` (a dependency is down): one warning line, then
  the next round after the backoff — the expected, self-healing case;
- anything else: the traceback is logged, then the same backoff;
- ``asyncio.CancelledError``: the loop ends (never swallowed).

A cancel that a library swallows still ends the loop, after the round in hand: Python
3.11's ``asyncio.wait_for`` returns its future's result instead of raising when the cancel
lands as that future completes (CPython gh-86296, fixed in 3.12). redis-py sends every
command through it when the client has a ``socket_timeout`` (all of ours: ``small_pool``),
and the broker inspector awaits its ``query_task`` thread that way; the loop then went on,
and a stopped gateway's recovery pass kept deciding on the shared database. The task's
``cancelling()`` count still says a cancel was asked for, and is checked after every round.

The backoff doubles from ``first`` up to ``cap`` seconds and resets after a round that
returns normally.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.domain.errors import Unavailable

log = logging.getLogger(__name__)

#: One round of a loop: returns the seconds to wait before the next (None: no wait).
Step = Callable[[], Awaitable[float | None]]


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait after consecutive failures: ``first``, doubling, at most ``cap``."""

    first: float = 0.2
    cap: float = 5.0

    def after(self, failures: int) -> float:
        """The wait after the ``failures``-th consecutive failure (1-based)."""
        return min(self.first * 2.0 ** (failures - 1), self.cap)


async def supervise(
    name: str, step: Step, *, backoff: Backoff = Backoff(), until: Callable[[], bool] | None = None
) -> None:
    """Run ``step`` until cancelled (or ``until()`` is true after a round), surviving any
    one failure of it.

    Args:
        name: What the loop is called in log lines.
        step: One round of the loop (see the module docstring).
        backoff: The waits after consecutive failures.
        until: Asked after each round; True ends the loop (a graceful stop).
    """
    failures = 0
    while until is None or not until():
        try:
            delay = await step()
        except Unavailable as exc:
            failures += 1
            wait = backoff.after(failures)
            log.warning("%s paused %.1fs: %s", name, wait, exc)
        except Exception:  # a background loop must outlive any one failure
            failures += 1
            wait = backoff.after(failures)
            log.exception("%s failed; going on in %.1fs", name, wait)
        else:
            failures = 0
            wait = delay or 0.0
        if _cancel_requested():
            raise asyncio.CancelledError  # asked to stop, and the step lost the cancel (see above)
        if wait > 0:
            await asyncio.sleep(wait)
        elif failures == 0:
            await asyncio.sleep(0)  # a step that never suspends must not starve the loop


def _cancel_requested() -> bool:
    """Whether this task was asked to cancel and no one took the request back (``uncancel``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Supervisor:
    """Owns a process's background loops: started by name, cancelled together."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(
        self, name: str, step: Step, *, backoff: Backoff = Backoff(), until: Callable[[], bool] | None = None
    ) -> None:
        """Run ``supervise(name, step, backoff=backoff, until=until)`` as a task of this supervisor."""
        if name in self._tasks:
            raise ValueError(f"a loop named {name!r} is running already")
        loop = supervise(name, step, backoff=backoff, until=until)
        self._tasks[name] = asyncio.create_task(loop, name=f"taskgate-{name}")

    def task(self, name: str) -> asyncio.Task[None]:
        """The task running the loop ``name``."""
        return self._tasks[name]

    @property
    def names(self) -> list[str]:
        """The loops started so far, in order."""
        return list(self._tasks)

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel every loop and wait (at most ``timeout`` seconds) until each has ended.

        A loop still running after that is logged by name and left behind: stopping the
        process must not hang on one driver's clean-up.
        """
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        self._tasks.clear()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.warning("%s did not stop within %.0fs; left behind", task.get_name(), timeout)
