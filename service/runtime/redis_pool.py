"""The small, bounded Redis connection pools the adapters use (one place for their options)."""

from __future__ import annotations

import os

import redis.asyncio as aioredis


def small_pool(
    url: str, role: str, *, size: int, wait: float = 10.0, socket_timeout: float = 5.0
) -> aioredis.Redis:
    """A client on at most ``size`` connections to ``url``, named ``taskgate-<pid>-<role>``
    (visible in CLIENT LIST); a caller waits at most ``wait`` seconds for a free one."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=wait,
        socket_timeout=socket_timeout,
        socket_connect_timeout=3,
        client_name=f"taskgate-{os.getpid()}-{role}",
    )
    return aioredis.Redis.from_pool(pool)
