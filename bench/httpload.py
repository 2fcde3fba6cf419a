"""HTTP/1.1 keep-alive load generator for Flower: ``python -m bench.httpload`` prints one JSON line.

No HTTP client library is needed: each worker owns one persistent connection (plain
asyncio streams) and keeps one ``POST`` in flight on it, so N workers = N in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from bench.drive import Call, LoadResult, drive


class HttpError(Exception):
    """A non-2xx answer."""


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs the same body again and again."""

    def __init__(self, host: str, port: int, path: str, body: bytes) -> None:
        self._host = host
        self._port = port
        self._request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode() + body
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self) -> None:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._reader, self._writer
        try:
            writer.write(self._request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if not 200 <= status < 300:
            raise HttpError(f"HTTP {status}: {body[:200]!r}")

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def run(
    host: str, port: int, path: str, body: bytes, *, concurrency: int, warmup: float, duration: float
) -> LoadResult:
    connections = [Connection(host, port, path, body) for _ in range(concurrency)]
    calls: list[Call] = [connection.post for connection in connections]
    try:
        return await drive(calls, warmup=warmup, duration=duration)
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpload")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/task/async-apply/demo.add")
    parser.add_argument("--body", default='{"args": [2, 3]}')
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            args.host,
            args.port,
            args.path,
            args.body.encode(),
            concurrency=args.concurrency,
            warmup=args.warmup,
            duration=args.duration,
        )
    )
    sys.stdout.write(result.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
