"""Runs each delivery of a task id at most once.

A task id can reach the workers twice: the gateway's outbox may publish it again after a
crash between publishing and marking it published, and the Redis broker redelivers a
message whose visibility timeout passed. Before running, a worker claims
``(task_id, retries)`` in Redis with ``SET NX``; a delivery that finds the claim taken is
skipped. A Celery retry has a higher ``retries`` and so claims afresh.

The claim lives in the result backend's Redis, under the app's ``taskgate_key_prefix``
setting (``taskgate.worker.configure`` sets it), or else the backend's ``global_keyprefix``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from taskgate.worker.contract import KEY_PREFIX_SETTING, RedisKeys

log = logging.getLogger(__name__)

#: How long a claim is kept, in seconds (longer than any redelivery window).
CLAIM_TTL = 7 * 86400


def app_key_prefix(app: Celery) -> str:
    """The key prefix an app's taskgate keys go under."""
    conf = app.conf
    prefix = conf.get(KEY_PREFIX_SETTING)
    if prefix is None:
        options = conf.get("result_backend_transport_options") or {}
        prefix = options.get("global_keyprefix", "")
    return str(prefix or "")


class OnceTask(Task):  # type: ignore[type-arg]
    """A Celery task base class that skips deliveries of an id that already ran."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.id and not request.called_directly and not request.is_eager:
            keys = RedisKeys(app_key_prefix(self.app))
            client: Any = getattr(self.backend, "client")  # noqa: B009 - untyped in the stubs
            key = keys.run_claim(request.id, int(request.retries or 0))
            if not client.set(key, request.hostname or "1", nx=True, ex=CLAIM_TTL):
                log.warning("task_id=%s skipped: this delivery already ran", request.id)
                raise Ignore()
        return super().__call__(*args, **kwargs)
