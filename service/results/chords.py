"""The result-backend writes a chord needs before its header tasks are published.

On the Redis result backend Celery has no ``chord_unlock``: whoever applies a chord sets
``celery-taskset-meta-<group_id>.s`` to the header's size (and clears ``.c``), and the
last header task to finish fires the body. The workflow use case makes the writes Celery's
canvas would have made (``service.broker.canvas``) through this adapter, before the
workflow is committed: none of its entry messages can be published before them.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from service.domain.workflow import BackendWrite
from service.results.hub import redis_errors
from service.runtime.redis_pool import small_pool
from taskgate.worker.contract import CelerySettings


class BackendWriter:
    """Makes recorded result-backend writes (SET with expiry, DEL) in one round trip."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    @classmethod
    def from_settings(cls, settings: CelerySettings) -> BackendWriter:
        """A writer on a small pool of connections to ``settings.result_backend``."""
        return cls(small_pool(settings.result_backend, "chords", size=4))

    async def write(self, writes: Sequence[BackendWrite]) -> None:
        """Make ``writes`` in order.

        Raises:
            ResultBackendUnavailable: Redis is unreachable (some writes may be made: they
                are idempotent, the caller may retry).
        """
        if not writes:
            return
        pipe = self._client.pipeline(transaction=False)
        for write in writes:
            if write.value is None:
                pipe.delete(write.key)
            else:
                pipe.set(write.key, write.value, ex=write.expire)
        with redis_errors():
            await pipe.execute()

    async def aclose(self) -> None:
        """Release the connections."""
        await self._client.aclose()
