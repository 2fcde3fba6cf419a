"""The result backend's side of recovery: worker heartbeats, and the documents of lost runs.

- A worker running the taskgate library keeps ``RedisKeys.worker_heartbeat(hostname)``
  alive (SET with a TTL, refreshed every ``TASKGATE_WORKER_HEARTBEAT`` seconds); ``alive``
  says which of some workers' keys exist.
- A run lost with its worker left a STARTED (or PROGRESS) document behind: ``forget``
  deletes it before the task is republished, so that a reconcile does not read the dead
  run back over the new one.
- A task that ends FAILED ``WorkerLost`` gets the FAILURE document its worker would have
  written (SETEX and PUBLISH, as Celery's backend does): open streams end, other
  replicas and later reconciles read the same truth.
- ``reported`` says which tasks a worker has written anything for (a result document or a
  run-once claim): such a task is not lost by the broker, whatever its queue holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import Any

import orjson
import redis.asyncio as aioredis

from service.domain.model import TaskError
from service.results.hub import redis_errors
from service.runtime.redis_pool import small_pool
from taskgate.worker.contract import CelerySettings, RedisKeys


def failure_document(task_id: str, error: TaskError, now: dt.datetime) -> bytes:
    """The FAILURE result document Celery's Redis backend would store for ``error``."""
    document: dict[str, Any] = {
        "status": "FAILURE",
        "result": {"exc_type": error.type, "exc_message": [error.message], "exc_module": "builtins"},
        "traceback": error.traceback or None,
        "children": [],
        "date_done": now.isoformat(),
        "task_id": task_id,
    }
    return orjson.dumps(document)


class ResultKeys:
    """Reads heartbeats and writes the documents of lost runs on the result backend."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, *, result_expires: int = 86400) -> None:
        self._client = client
        self._keys = keys
        self._expires = result_expires

    @classmethod
    def from_settings(cls, settings: CelerySettings) -> ResultKeys:
        """Result keys on one small connection pool to ``settings.result_backend``."""
        client = small_pool(settings.result_backend, "recovery", size=2)
        return cls(client, settings.keys, result_expires=settings.result_expires)

    async def alive(self, hostnames: Collection[str]) -> set[str]:
        """Those of ``hostnames`` whose heartbeat key exists.

        Raises:
            ResultBackendUnavailable: Redis is unreachable.
        """
        names = sorted(hostnames)
        if not names:
            return set()
        with redis_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.exists(self._keys.worker_heartbeat(name))
                found = await pipe.execute()
        return {name for name, exists in zip(names, found, strict=True) if exists}

    async def reported(self, task_ids: Collection[str]) -> set[str]:
        """Those of ``task_ids`` a worker wrote a result document or a run claim for."""
        ids = sorted(task_ids)
        if not ids:
            return set()
        with redis_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.exists(self._keys.task_meta(task_id), self._keys.run_claim(task_id, 0))
                found = await pipe.execute()
        return {task_id for task_id, count in zip(ids, found, strict=True) if count}

    async def forget(self, task_ids: Collection[str]) -> None:
        """Delete the result documents of ``task_ids`` (runs lost with their worker)."""
        if task_ids:
            with redis_errors():
                await self._client.delete(*(self._keys.task_meta(task_id) for task_id in task_ids))

    async def announce_failed(self, task_ids: Collection[str], error: TaskError, now: dt.datetime) -> None:
        """Store and publish a FAILURE document with ``error`` for each of ``task_ids``."""
        if not task_ids:
            return
        with redis_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    key = self._keys.task_meta(task_id)
                    document = failure_document(task_id, error, now)
                    pipe.setex(key, self._expires, document)
                    pipe.publish(key, document)
                await pipe.execute()

    async def aclose(self) -> None:
        """Release the connections."""
        await self._client.aclose(close_connection_pool=True)
