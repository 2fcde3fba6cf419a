"""gRPC load generator: ``python -m bench.loadgen`` prints one JSON LoadResult line.

One asyncio process, a few channels, N calls of ``TaskService/Enqueue`` (or ``EnqueueAt``,
or ``EnqueueBatch`` of ``--batch-size`` tasks) in flight; run as its own process so it never
shares an event loop with a server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys

from google.protobuf import struct_pb2, timestamp_pb2
from grpc import aio

from bench.drive import Call, LoadResult, drive
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc

TASK_NAME = "demo.add"


def _args() -> struct_pb2.ListValue:
    args = struct_pb2.ListValue()
    args.extend([2, 3])
    return args


def _call(stub: pb_grpc.TaskServiceStub, method: str, run_time: float | None, batch_size: int = 500) -> Call:
    if method == "batch":
        batch = pb.EnqueueBatchRequest(
            tasks=[pb.BatchTask(task_name=TASK_NAME, args=_args()) for _ in range(batch_size)]
        )

        async def enqueue_batch() -> None:
            response = await stub.EnqueueBatch(batch, timeout=30)  # type: ignore[misc]  # sync stub types
            if len(response.tasks) != batch_size:
                raise RuntimeError(f"{len(response.tasks)} task ids for {batch_size} tasks")

        return enqueue_batch
    if method == "enqueue":
        request = pb.EnqueueRequest(task_name=TASK_NAME, args=_args())

        async def enqueue() -> None:
            await stub.Enqueue(request, timeout=30)  # type: ignore[misc]  # stubs type the sync stub

        return enqueue
    if run_time is None:
        raise ValueError("enqueue_at needs --run-time")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.fromtimestamp(run_time, dt.UTC))
    at_request = pb.EnqueueAtRequest(task_name=TASK_NAME, args=_args(), run_time=stamp)

    async def enqueue_at() -> None:
        await stub.EnqueueAt(at_request, timeout=30)  # type: ignore[misc]  # stubs type the sync stub

    return enqueue_at


async def run(
    target: str,
    *,
    method: str,
    concurrency: int,
    warmup: float,
    duration: float,
    channels: int = 2,
    total: int | None = None,
    run_time: float | None = None,
    batch_size: int = 500,
) -> LoadResult:
    """Drive ``target`` with ``concurrency`` calls in flight spread over ``channels`` channels."""
    # distinct channel arguments keep gRPC from sharing one subchannel (one connection)
    opened = [aio.insecure_channel(target, options=[("bench.channel", i)]) for i in range(channels)]
    try:
        for channel in opened:
            await asyncio.wait_for(channel.channel_ready(), 15)
        stubs = [pb_grpc.TaskServiceStub(channel) for channel in opened]
        calls = [_call(stubs[i % channels], method, run_time, batch_size) for i in range(concurrency)]
        return await drive(calls, warmup=warmup, duration=duration, total=total)
    finally:
        for channel in opened:
            await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--method", choices=["enqueue", "enqueue_at", "batch"], default="enqueue")
    parser.add_argument("--batch-size", type=int, default=500, help="tasks per EnqueueBatch call")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--total", type=int, help="issue exactly this many calls instead of a duration")
    parser.add_argument("--run-time", type=float, help="EnqueueAt run time, seconds since the epoch")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            args.target,
            method=args.method,
            concurrency=args.concurrency,
            warmup=args.warmup,
            duration=args.duration,
            channels=args.channels,
            total=args.total,
            run_time=args.run_time,
            batch_size=args.batch_size,
        )
    )
    sys.stdout.write(result.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
