"""Carrying out a cancel on the worker side: the durable mark, the REVOKED document, revoke.

- The cancellation mark (``RedisKeys.cancel_mark``) in the result backend's Redis is what
  makes a cancel stick: workers check it before running a task and at every progress
  report (``taskgate.worker.cancel``), also workers that were down when it was set.
- A task cancelled before it was handed to the broker gets a REVOKED result document
  (``SETEX`` and ``PUBLISH``, as Celery writes it), so the streams watching it on every
  gateway replica end with CANCELLED.
- Celery's broadcast ``revoke`` (``terminate`` for a running task) is sent too, on one
  thread of its own and bounded in time: it is best effort, nothing depends on it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor

import orjson
import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError

from service.domain.errors import ResultBackendUnavailable
from service.runtime.redis_pool import small_pool
from taskgate.worker.contract import CANCEL_MARK_TTL, CelerySettings, RedisKeys

log = logging.getLogger(__name__)

#: Seconds a broadcast revoke may take before the cancel stops waiting for it.
REVOKE_TIMEOUT = 5.0
#: The exception a REVOKED document names (as Celery's own).
_REVOKED = {"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions"}


class CancelSignals:
    """Writes cancellation marks and REVOKED documents, and broadcasts revokes."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, app: Celery, result_ttl: int) -> None:
        self._client = client
        self._keys = keys
        self._app = app
        self._result_ttl = result_ttl
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskgate-revoke")

    @classmethod
    def from_settings(cls, settings: CelerySettings, app: Celery) -> CancelSignals:
        """Signals on a small pool to ``settings.result_backend``; ``app`` sends the revokes
        (a send-only app: ``service.broker.publisher.send_only_app``)."""
        client = small_pool(settings.result_backend, "cancel", size=2, wait=5)
        return cls(client, settings.keys, app, settings.result_expires)

    async def mark(self, task_id: str, reason: str) -> None:
        """Set the durable cancellation mark of ``task_id``.

        Raises:
            ResultBackendUnavailable: Redis is unreachable (nothing was marked).
        """
        try:
            await self._client.set(self._keys.cancel_mark(task_id), reason, ex=CANCEL_MARK_TTL)
        except (RedisError, OSError) as exc:
            raise ResultBackendUnavailable(f"result backend unreachable: {type(exc).__name__}") from exc

    async def announce_cancelled(self, task_id: str, reason: str, when: dt.datetime) -> None:
        """Store and publish a REVOKED document for a task no worker will ever see (a
        failure is logged: the database already holds CANCELLED)."""
        document: dict[str, object] = {
            "status": "REVOKED",
            "result": {**_REVOKED, "exc_message": [reason or "cancelled"]},
            "traceback": None,
            "children": [],
            "date_done": when.isoformat(),
            "task_id": task_id,
        }
        payload = orjson.dumps(document)
        key = self._keys.task_meta(task_id)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.set(key, payload, ex=self._result_ttl)
            pipe.publish(key, payload)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("task_id=%s: REVOKED document not written: %r", task_id, exc)

    async def revoke(self, task_id: str, *, terminate: bool) -> None:
        """Broadcast Celery's revoke (best effort, at most ``REVOKE_TIMEOUT`` seconds)."""
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._executor, self._revoke_blocking, task_id, terminate)
        try:
            await asyncio.wait_for(call, REVOKE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - best effort: the mark is what counts
            log.warning("task_id=%s: broadcast revoke failed: %r", task_id, exc)

    def _revoke_blocking(self, task_id: str, terminate: bool) -> None:
        self._app.control.revoke(task_id, terminate=terminate)

    async def aclose(self) -> None:
        """Release the Redis connections and the revoke thread."""
        await self._client.aclose()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
