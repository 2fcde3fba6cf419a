"""How long and how much: the default run and the ``--quick`` smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    rounds: int
    warmup: float
    #: seconds of the throughput measurement (64 in flight)
    throughput_duration: float
    #: seconds of the latency measurement (16 in flight)
    latency_duration: float
    throughput_concurrency: int = 64
    latency_concurrency: int = 16
    #: gRPC channels of the load generator (the calls are spread over them)
    channels: int = 2
    scheduled_tasks: int = 10_000
    profile_seconds: float = 10.0
    #: tasks per EnqueueBatch call, and calls in flight
    batch_size: int = 500
    batch_concurrency: int = 4
    #: load-generator channels of the scale-out section (connections the kernel spreads over processes)
    scaleout_channels: int = 8
    #: held EnqueueAt tasks of the scale-out section's dispatcher check (4 relay batches of 500)
    scaleout_held: int = 2_000
    #: concurrent StreamProgress streams of the streams section (one task each)
    streams: int = 10_000
    #: table sizes of the ListTasks section (first page at each)
    list_small: int = 10_000
    list_large: int = 1_000_000
    #: cron schedules of the schedules section, all due in the same minute
    schedules: int = 10_000


DEFAULT = Plan(rounds=3, warmup=1.0, throughput_duration=6.0, latency_duration=5.0)
QUICK = Plan(
    rounds=2,
    warmup=0.5,
    throughput_duration=2.0,
    latency_duration=2.0,
    scheduled_tasks=1_000,
    profile_seconds=3.0,
    streams=1_000,
    list_large=100_000,
    schedules=1_000,
)
