"""Runs each delivery of a task id at most once.

A task id can reach the workers twice: the gateway's outbox may publish it again after a
crash between publishing and marking it published, and the Redis broker redelivers a
message whose visibility timeout passed. Before running, a worker claims
``(task_id, retries)`` in Redis with ``SET NX``; a delivery that finds the claim taken is
skipped. A Celery retry has a higher ``retries`` and so claims afresh.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Ignore

log = logging.getLogger(__name__)

#: How long a claim is kept, in seconds (longer than any redelivery window).
CLAIM_TTL = 7 * 86400


def claim_key(prefix: str, task_id: str, retries: int) -> str:
    """The Redis key that records a run of ``task_id`` at attempt ``retries``."""
    return f"{prefix}taskgate-run-{task_id}-{retries}"


class OnceTask(Task):  # type: ignore[type-arg]
    """A Celery task base class that skips deliveries of an id that already ran."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.id and not request.called_directly and not request.is_eager:
            prefix = getattr(self.app.conf, "taskgate_key_prefix", "")
            client: Any = getattr(self.backend, "client")  # noqa: B009 - untyped in the stubs
            key = claim_key(prefix, request.id, int(request.retries or 0))
            if not client.set(key, request.hostname or "1", nx=True, ex=CLAIM_TTL):
                log.warning("task_id=%s skipped: this delivery already ran", request.id)
                raise Ignore()
        return super().__call__(*args, **kwargs)
