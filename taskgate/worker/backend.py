"""The result backend of a taskgate worker: Celery's Redis backend, plus the state feed.

``FeedRedisBackend`` writes exactly what Celery's ``RedisBackend`` writes (``SETEX`` of
``celery-task-meta-<id>`` and a ``PUBLISH`` of the same document) and, in the same
``MULTI`` pipeline, appends ``{"id": <task_id>, "doc": <the document>}`` to the deployment's
state feed (``RedisKeys.state_feed``, a Redis Stream trimmed to about
``STATE_FEED_MAXLEN`` entries). The gateway consumes the feed with a consumer group and
acknowledges an entry only after its database write, so a state is never lost to a
dropped pub/sub message, an expired key or a gateway that was down.

Three more rules than Celery's own:

- STARTED carries the worker's own start time (``result.start_time``, ISO-8601 UTC) and
  its heartbeat ``instance`` beside ``pid`` and ``hostname``;
- every document carries ``"taskgate_feed": 1`` (``contract.FEED_MARK``): the gateways
  write it from the feed alone, once, however many replicas receive its pub/sub copy;
- a state that is not final never replaces a final one (SUCCESS, FAILURE, REVOKED) — Celery
  itself protects only SUCCESS — and a delivery the run-once guard skips writes no STARTED.

``taskgate.worker.configure(app)`` installs it as the app's backend class; the app's
``result_backend`` URL stays as it is.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from kombu.utils.encoding import bytes_to_str

from taskgate.worker import heartbeat
from taskgate.worker.contract import FEED_MARK, STATE_FEED_MAXLEN, RedisKeys
from taskgate.worker.guard import app_key_prefix, is_skipped

log = logging.getLogger(__name__)


def backend_url(url: Any) -> str | None:
    """The URL part Celery gives a backend class for a ``result_backend`` setting.

    ``redis+socket:///path`` names the class before ``+`` (as ``celery.app.backends.by_url``
    reads it); anything else is passed as it is.
    """
    if not isinstance(url, str) or "://" not in url:
        return None
    scheme, _, _ = url.partition("://")
    return url.split("+", 1)[1] if "+" in scheme else url


#: Celery's Redis backend, untyped in the stubs beyond its public methods.
_RedisBackend: Any = RedisBackend


class FeedRedisBackend(_RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend that also appends every task state to the state feed."""

    def __init__(self, *args: Any, url: str | None = None, **kwargs: Any) -> None:
        app = kwargs.get("app")
        if url is None and app is not None:
            url = backend_url(app.conf.result_backend)
        super().__init__(*args, url=url, **kwargs)
        self.feed_key = RedisKeys(app_key_prefix(self.app)).state_feed
        self._meta_prefix = bytes(self.task_keyprefix)

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Celery's ``_store_result`` with the rules of this module's docstring."""
        if state == states.STARTED:
            if is_skipped(request):
                return result
            if isinstance(result, dict):
                started = dt.datetime.now(dt.UTC).isoformat()
                result = {**result, "start_time": started, "instance": heartbeat.INSTANCE}
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        meta[FEED_MARK] = 1  # this document is also in the feed (``_set``): see the contract
        current = self._get_task_meta_for(task_id)["status"]
        if current == states.SUCCESS or (current in states.READY_STATES and state not in states.READY_STATES):
            log.info("task_id=%s: %s not stored over the final %s", task_id, state, current)
            return result
        self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        return result

    def _set(self, key: Any, value: Any, expires: int | None = None) -> None:
        """SET with expiry + PUBLISH (Celery's) + XADD to the state feed for task documents, one MULTI."""
        if expires is None:
            expires = self.expires
        with self.client.pipeline() as pipe:
            pipe.set(key, value, ex=expires or None)  # SETEX (the method is deprecated)
            pipe.publish(key, value)
            raw = key if isinstance(key, bytes) else str(key).encode()
            if raw.startswith(self._meta_prefix):
                task_id = raw[len(self._meta_prefix) :]
                fields = {"id": task_id, "doc": value}
                pipe.xadd(self.feed_key, fields, maxlen=STATE_FEED_MAXLEN, approximate=True)
            pipe.execute()


__all__ = ["FeedRedisBackend", "backend_url"]
