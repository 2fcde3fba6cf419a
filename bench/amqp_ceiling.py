"""The ceiling of the local RabbitMQ: confirmed publishes per second with the fewest layers.

No gateway, no database, no gRPC: one process writes ``--messages`` Celery-sized messages
(the bytes ``service.broker.amqp.build_amqp`` gives for ``demo.add(2, 3)``) with
``FramePublisher`` on one aiormq channel in confirm mode, ``--batch`` messages per batch and
``--windows`` batches in flight, to a queue on a vhost of its own (``rabbitmqctl add_vhost``,
deleted at the end). It prints messages/s, the RabbitMQ node's CPU per message (``beam.smp``'s
utime+stime delta over the run / messages, less its idle rate measured just before) and this
publisher's own CPU per message — what the issue's targets (10,000 tasks/s EnqueueBatch, 3x
Flower) cost the 2 shared cores before any gateway work. Two cases by default: persistent
messages (``delivery_mode=2``) to a durable queue, and transient messages to a transient queue.

    .venv/bin/python -m bench.amqp_ceiling [--messages 50000] [--batch 250] [--windows 4]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import resource
import subprocess
import time
import uuid
from typing import cast

import aio_pika
import aiormq

from bench.amqp import AMQP_BASE, _broker_pid
from bench.infra import cpu_seconds
from service.broker.amqp import build_amqp
from service.broker.amqp_frames import FramePublisher, Outgoing
from service.domain.model import Delivery


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _messages(count: int, queue: str, *, persistent: bool) -> list[Outgoing]:
    now = dt.datetime.now(dt.UTC)
    messages: list[Outgoing] = []
    for _ in range(count):
        task_id = str(uuid.uuid4())
        delivery = Delivery(task_id=task_id, task_name="demo.add", args=[2, 3], kwargs={}, run_time=now)
        body, properties = build_amqp(delivery, origin="gen1@bench", reply_to=str(uuid.uuid4()), now=now)
        if not persistent:
            properties = dataclasses.replace(properties, delivery_mode=1)
        messages.append((queue, body, properties))
    return messages


@dataclasses.dataclass
class Result:
    """One case's run: the rate, and CPU per message of the node and of this publisher."""

    case: str
    messages: int
    seconds: float
    broker_us: float | None
    publisher_us: float
    message_bytes: int

    def line(self) -> str:
        rate = self.messages / self.seconds
        if self.broker_us is None:
            broker = "     —"
        else:  # the node's cores busy at this rate, and what 10,000/s would take of them
            broker = (
                f"{self.broker_us:6.1f} µs/msg ({self.broker_us * rate / 1e6:.2f} cores busy; "
                f"{self.broker_us * 10_000 / 1e6:.2f} cores at 10,000/s)"
            )
        return (
            f"{self.case:<27} {rate:7,.0f} msg/s  RabbitMQ {broker}  publisher {self.publisher_us:5.1f} "
            f"µs/msg  ({self.messages:,} msgs of {self.message_bytes} B, {self.seconds:.2f} s)"
        )


async def _run_case(url: str, case: str, args: argparse.Namespace, *, persistent: bool) -> Result:
    queue = f"ceiling-{uuid.uuid4().hex[:8]}"
    messages = _messages(args.messages, queue, persistent=persistent)
    size = len(messages[0][1]) + len(messages[0][2].encode("x" * 20))
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        declared = await channel.declare_queue(queue, durable=persistent, auto_delete=False)
        raw = cast(aiormq.Channel, await channel.get_underlay_channel())
        frames = FramePublisher(raw, id_prefix=f"{uuid.uuid4().hex[:12]}.")
        batches = [messages[i : i + args.batch] for i in range(0, len(messages), args.batch)]
        await frames.publish(batches[0][:1])  # warm the path (not counted)
        broker = _broker_pid()
        idle_rate = 0.0
        if broker:
            before, started = cpu_seconds(broker), time.monotonic()
            await asyncio.sleep(args.idle)
            idle_rate = (cpu_seconds(broker) - before) / (time.monotonic() - started)
        window = asyncio.Semaphore(args.windows)
        nacked = 0

        async def one(batch: list[Outgoing]) -> None:
            """Publish one batch once one of the ``windows`` is free; count what was not acked."""
            nonlocal nacked
            async with window:
                acked = await frames.publish(batch)
            nacked += acked.count(False)

        broker_before = cpu_seconds(broker) if broker else 0.0
        own_before, started = _own_cpu(), time.monotonic()
        await asyncio.gather(*(one(batch) for batch in batches))
        seconds = time.monotonic() - started
        own = _own_cpu() - own_before
        broker_us = None
        if broker:
            broker_cpu = cpu_seconds(broker) - broker_before - idle_rate * seconds
            broker_us = broker_cpu / args.messages * 1e6
        if nacked:
            raise RuntimeError(f"{nacked} message(s) not acknowledged")
        check = await channel.declare_queue(queue, passive=True)
        depth = check.declaration_result.message_count or 0
        if depth != args.messages + 1:
            raise RuntimeError(f"queue holds {depth}, expected {args.messages + 1}")
        await declared.delete(if_unused=False, if_empty=False)
        return Result(case, args.messages, seconds, broker_us, own / args.messages * 1e6, size)
    finally:
        await connection.close()


async def _main(args: argparse.Namespace) -> None:
    vhost = f"tgceiling-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = f"{AMQP_BASE}/{vhost}"
        print(f"vhost {vhost}: {args.messages:,} messages, {args.batch} per batch, {args.windows} in flight")
        for _ in range(args.repeat):
            for case, persistent in (
                ("persistent, durable queue", True),
                ("transient, transient queue", False),
            ):
                if case.startswith("transient") and args.persistent_only:
                    continue
                print((await _run_case(url, case, args, persistent=persistent)).line(), flush=True)
    finally:
        try:
            _rabbitmqctl("delete_vhost", vhost)
        except subprocess.CalledProcessError:  # the node is down (a test's stop_app): say so
            print(f"could not delete vhost {vhost}: rabbitmqctl delete_vhost {vhost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=250, help="messages per batch (one confirm wait)")
    parser.add_argument("--windows", type=int, default=4, help="batches in flight at once")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--idle", type=float, default=1.0, help="seconds of RabbitMQ idle CPU sampled first")
    parser.add_argument("--persistent-only", action="store_true")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
