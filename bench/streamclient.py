"""Stream-benchmark clients: ``python -m bench.streamclient enqueue | watch``.

``enqueue`` creates tasks on a queue no worker consumes and writes their ids, one per line.
``watch`` opens one StreamProgress per id (spread over several channels), prints
``open <opened> <failed>`` once every stream has its snapshot, then reads until every
stream ended and prints one JSON line: how many streams saw the terminal update, and the
delay of every message that carries the writer's send time (``time.monotonic()`` seconds in
``progress.details.sent`` or ``result.sent``), in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

from google.protobuf import struct_pb2
from grpc import aio

from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

Stream = aio.UnaryStreamCall[pb.StreamProgressRequest, pb.StreamProgressResponse]
TERMINAL = (pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED)


def _channels(target: str, count: int) -> list[aio.Channel]:
    # distinct channel arguments keep gRPC from sharing one subchannel (one connection)
    return [aio.insecure_channel(target, options=[("bench.channel", i)]) for i in range(count)]


async def enqueue(target: str, count: int, queue: str, concurrency: int, channels: int) -> list[str]:
    """Enqueue ``count`` demo.add tasks on ``queue``; their ids in order of acceptance."""
    opened = _channels(target, channels)
    args = struct_pb2.ListValue()
    args.extend([2, 3])
    request = pb.EnqueueRequest(task_name="demo.add", args=args, queue=queue)
    ids: list[str] = []
    left = count

    async def worker(stub: pb_grpc.TaskServiceStub) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            response = await stub.Enqueue(request, timeout=60)  # type: ignore[misc]  # stubs type the sync stub
            ids.append(response.task_id)

    try:
        stubs = [pb_grpc.TaskServiceStub(channel) for channel in opened]
        await asyncio.gather(*(worker(stubs[i % channels]) for i in range(concurrency)))
    finally:
        for channel in opened:
            await channel.close()
    return ids


class Tally:
    """What the streams of this process saw."""

    def __init__(self) -> None:
        self.opened = 0
        self.failed = 0
        self.terminal = 0
        self.messages = 0
        self.errors = 0
        self.first_error = ""
        self.progress_ms: list[float] = []
        self.success_ms: list[float] = []

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        self.first_error = self.first_error or repr(exc)[:300]

    def seen(self, task: pb.Task, now: float) -> None:
        """Account for one message after the snapshot, received at ``now`` (time.monotonic())."""
        self.messages += 1
        if task.state in TERMINAL:
            self.terminal += 1
            sent = task.result.struct_value.fields.get("sent")
            if sent is not None:
                self.success_ms.append((now - sent.number_value) * 1000)
        elif (sent := task.progress.details.fields.get("sent")) is not None:
            self.progress_ms.append((now - sent.number_value) * 1000)

    def as_json(self) -> str:
        data: dict[str, Any] = {
            "opened": self.opened,
            "failed": self.failed,
            "terminal": self.terminal,
            "messages": self.messages,
            "errors": self.errors,
            "first_error": self.first_error,
            "progress_ms": [round(v, 3) for v in self.progress_ms],
            "success_ms": [round(v, 3) for v in self.success_ms],
        }
        return json.dumps(data)


async def _first(call: Stream) -> pb.StreamProgressResponse | BaseException:
    """The stream's first message (the snapshot), or what went wrong."""
    try:
        first = await call.read()
    except Exception as exc:  # noqa: BLE001 - counted and reported by the caller
        return exc
    if first is aio.EOF:
        return RuntimeError("the stream ended before its snapshot")
    assert isinstance(first, pb.StreamProgressResponse)
    return first


async def watch(target: str, ids: list[str], channels: int, opening: int, timeout: float) -> Tally:
    """Open a stream per id (at most ``opening`` waiting for their snapshot), read them all to the end."""
    tally = Tally()
    opened = _channels(target, channels)
    gate = asyncio.Semaphore(opening)
    all_open = asyncio.Event()
    pending_open = len(ids)

    def one_less() -> None:
        nonlocal pending_open
        pending_open -= 1
        if pending_open == 0:
            all_open.set()

    async def follow(stub: pb_grpc.TaskServiceStub, task_id: str) -> None:
        # the call starts inside the gate: a burst of thousands of new calls at once overflows
        # gRPC core's queue of calls the server has not picked up yet, and those are CANCELLED
        async with gate:
            call = cast(Stream, stub.StreamProgress(pb.StreamProgressRequest(task_id=task_id)))
            first = await _first(call)
        if isinstance(first, BaseException):
            tally.failed += 1
            tally.error(first)
            call.cancel()
            one_less()
            return
        tally.opened += 1
        one_less()
        try:
            while (message := await call.read()) is not aio.EOF:
                assert isinstance(message, pb.StreamProgressResponse)
                tally.seen(message.task, time.monotonic())
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - counted and reported
            tally.error(exc)

    try:
        for channel in opened:
            await asyncio.wait_for(channel.channel_ready(), 15)
        stubs = [pb_grpc.TaskServiceStub(channel) for channel in opened]
        tasks = [asyncio.create_task(follow(stubs[i % channels], t)) for i, t in enumerate(ids)]
        if ids:
            await all_open.wait()
        # the delays measured from here on are the gateway's: keep this process's own
        # stop-the-world collections (thousands of live calls) out of them
        gc.collect()
        gc.freeze()
        gc.disable()
        print(f"open {tally.opened} {tally.failed}", flush=True)
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for channel in opened:
            await channel.close()
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streamclient")
    parser.add_argument("mode", choices=["enqueue", "watch"])
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--ids", type=Path, required=True, help="file of task ids (written by enqueue)")
    parser.add_argument("--count", type=int, default=1000, help="enqueue: how many tasks")
    parser.add_argument("--queue", default="bench-streams", help="enqueue: a queue no worker consumes")
    parser.add_argument("--concurrency", type=int, default=64, help="enqueue: calls in flight")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--opening", type=int, default=200, help="watch: streams waiting for a snapshot")
    parser.add_argument("--timeout", type=float, default=600.0, help="watch: seconds to wait for the ends")
    args = parser.parse_args(argv)
    if args.mode == "enqueue":
        ids = asyncio.run(enqueue(args.target, args.count, args.queue, args.concurrency, args.channels))
        args.ids.write_text("".join(f"{task_id}\n" for task_id in ids))
        sys.stdout.write(json.dumps({"enqueued": len(ids)}) + "\n")
        return 0
    ids = args.ids.read_text().split()
    tally = asyncio.run(watch(args.target, ids, args.channels, args.opening, args.timeout))
    sys.stdout.write(tally.as_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
