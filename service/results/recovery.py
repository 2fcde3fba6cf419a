"""The result backend's side of recovery: worker heartbeats, and the documents of lost runs.

- A worker running the taskgate library keeps ``RedisKeys.worker_heartbeat(hostname)``
  alive (SET with a TTL, refreshed every ``TASKGATE_WORKER_HEARTBEAT`` seconds); ``alive``
  says which of some workers' keys exist.
- A run lost with its worker left a STARTED (or PROGRESS) document behind: ``forget``
  (``forget_runs``, with the run claim) deletes it once the gateway's conditional requeue
  changed the row, so that a reconcile does not read the dead run back over the new one
  and the re-run is not skipped; a replica whose requeue changed nothing deletes nothing.
- A task that ends FAILED ``WorkerLost`` gets the FAILURE document its worker would have
  written (SETEX and PUBLISH, as Celery's backend does): open streams end, other
  replicas and later reconciles read the same truth.
- ``reported`` says which tasks a worker has written anything for (a result document or a
  run-once claim): such a task is not lost by the broker, whatever its queue holds.
- For a RUNNING task no live worker holds: ``results`` reads its stored result documents
  (``republish`` publishes one again, so streams and every replica see it),
  ``finished_claims`` says which runs the run-once guard marked ``done``, and
  ``feed_mark``/``feed_settled`` say whether the gateways' group has read and acknowledged
  every entry of the state feed up to a point (so that a state on its way through the feed
  is not mistaken for a lost one).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.domain.model import TaskError, TaskUpdate
from service.results.document import parse_payload
from service.results.hub import redis_errors
from service.runtime.redis_pool import small_pool
from taskgate.worker.contract import STATE_FEED_GROUP, CelerySettings, RedisKeys

#: A stream entry id as a comparable pair (milliseconds, sequence).
StreamId = tuple[int, int]


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A task's result document as stored: what it says, and its bytes."""

    update: TaskUpdate
    payload: bytes


def stream_id(value: bytes | str) -> StreamId:
    """``b"1700000000000-3"`` as ``(1700000000000, 3)``."""
    text = value.decode() if isinstance(value, bytes) else value
    millis, _, seq = text.partition("-")
    return int(millis), int(seq or 0)


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

    def __init__(
        self,
        client: aioredis.Redis,
        keys: RedisKeys,
        *,
        result_expires: int = 86400,
        feed_group: str = STATE_FEED_GROUP,
    ) -> None:
        self._client = client
        self._keys = keys
        self._expires = result_expires
        self._feed = keys.state_feed
        self._feed_group = feed_group

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

    async def forget_runs(self, runs: Mapping[str, int]) -> None:
        """Delete the result documents and run claims (task id -> attempt) of runs declared
        lost, so that their re-run is neither read over nor skipped by the guard."""
        if runs:
            keys = [self._keys.task_meta(task_id) for task_id in runs]
            keys += [self._keys.run_claim(task_id, attempt) for task_id, attempt in runs.items()]
            with redis_errors():
                await self._client.delete(*keys)

    async def announce_failed(self, task_ids: Collection[str], error: TaskError, now: dt.datetime) -> None:
        """Store and publish a FAILURE document with ``error`` for each of ``task_ids``."""
        if not task_ids:
            return
        with redis_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    key = self._keys.task_meta(task_id)
                    document = failure_document(task_id, error, now)
                    pipe.set(key, document, ex=self._expires)
                    pipe.publish(key, document)
                await pipe.execute()

    async def results(self, task_ids: Collection[str]) -> dict[str, StoredResult]:
        """The stored result documents of ``task_ids`` that exist and decode, by task id."""
        ids = sorted(task_ids)
        if not ids:
            return {}
        with redis_errors():
            payloads = await self._client.mget([self._keys.task_meta(task_id) for task_id in ids])
        now = dt.datetime.now(dt.UTC)
        found = {}
        for task_id, payload in zip(ids, payloads, strict=True):
            raw = (
                payload if isinstance(payload, bytes) else None if payload is None else str(payload).encode()
            )
            if raw is not None and (update := parse_payload(task_id, raw, now)) is not None:
                found[task_id] = StoredResult(update, raw)
        return found

    async def republish(self, stored: Iterable[StoredResult]) -> None:
        """PUBLISH stored documents again on their channels (as Celery's backend does)."""
        items = list(stored)
        if not items:
            return
        with redis_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for item in items:
                    pipe.publish(self._keys.task_meta(item.update.task_id), item.payload)
                await pipe.execute()

    async def finished_claims(self, runs: Mapping[str, int]) -> set[str]:
        """Those of ``runs`` (task id -> attempt) whose run claim the guard marked ``done``."""
        ids = sorted(runs)
        if not ids:
            return set()
        with redis_errors():
            claims = await self._client.mget(
                [self._keys.run_claim(task_id, runs[task_id]) for task_id in ids]
            )
        return {task_id for task_id, claim in zip(ids, claims, strict=True) if _claim_done(claim)}

    async def feed_mark(self) -> StreamId | None:
        """The id of the state feed's latest entry (None: there is no feed stream)."""
        with redis_errors():
            try:
                info: Any = await self._client.xinfo_stream(self._feed)
            except ResponseError:  # no such key
                return None
        return stream_id(info["last-generated-id"])

    async def feed_settled(self, mark: StreamId | None) -> bool:
        """Whether every state feed entry up to ``mark`` (a ``feed_mark``) has been read and
        acknowledged by the gateways' group, i.e. is in the database. True when there was
        no stream, when no group reads it (the feed is not consumed) and up to the stream's
        own latest id when the stream is younger than the mark (Redis lost it)."""
        if mark is None:
            return True
        with redis_errors():
            try:
                info: Any = await self._client.xinfo_stream(self._feed)
                groups: Any = await self._client.xinfo_groups(self._feed)
            except ResponseError:  # the stream is gone: nothing left to read
                return True
            target = min(mark, stream_id(info["last-generated-id"]))
            group = next((g for g in groups if _text(g["name"]) == self._feed_group), None)
            if group is None:
                return True
            if stream_id(group["last-delivered-id"]) < target:
                return False
            if not int(group["pending"]):
                return True
            summary: Any = await self._client.xpending(self._feed, self._feed_group)
        oldest = summary.get("min") if isinstance(summary, dict) else None
        return oldest is None or stream_id(oldest) > target

    async def aclose(self) -> None:
        """Release the connections."""
        await self._client.aclose(close_connection_pool=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _claim_done(claim: Any) -> bool:
    """Whether a stored run claim (JSON ``{"state": ...}``) says the run ended."""
    if claim is None:
        return False
    try:
        document = orjson.loads(claim)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and document.get("state") == "done"
