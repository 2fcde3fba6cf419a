"""The raw pub/sub baseline: ``python -m bench.streamraw --url URL --pattern P --expect N``.

A plain ``redis.asyncio`` PSUBSCRIBE client, alone in its process: prints ``ready`` once
the subscription is confirmed, then times every message that carries the writer's send
time (``details.sent`` of a PROGRESS, ``result.sent`` of a SUCCESS) until ``expect`` of
them arrived or ``timeout`` passed, and prints one JSON line of delays in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import redis.asyncio as aioredis


def _sent(document: Any) -> tuple[str, float] | None:
    if not isinstance(document, dict) or not isinstance(result := document.get("result"), dict):
        return None
    if document.get("status") == "SUCCESS" and isinstance(sent := result.get("sent"), float):
        return "success", sent
    details = result.get("details")
    if isinstance(details, dict) and isinstance(sent := details.get("sent"), float):
        return "progress", sent
    return None


async def listen(url: str, pattern: str, expect: int, timeout: float) -> dict[str, list[float]]:
    """Delays (ms) of the first ``expect`` timed messages on ``pattern``, by kind."""
    delays: dict[str, list[float]] = {"progress": [], "success": []}
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        await pubsub.psubscribe(pattern)
        while (confirm := await pubsub.get_message(timeout=5)) is None or confirm["type"] != "psubscribe":
            pass
        print("ready", flush=True)
        seen = 0
        async with asyncio.timeout(timeout):
            async for message in pubsub.listen():
                if message["type"] != "pmessage":
                    continue
                now = time.monotonic()
                if (stamp := _sent(json.loads(message["data"]))) is None:
                    continue
                kind, sent = stamp
                delays[kind].append(round((now - sent) * 1000, 3))
                seen += 1
                if seen >= expect:
                    break
    except TimeoutError:
        pass
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
    return delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streamraw")
    parser.add_argument("--url", required=True)
    parser.add_argument("--pattern", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    delays = asyncio.run(listen(args.url, args.pattern, args.expect, args.timeout))
    sys.stdout.write(json.dumps(delays) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
