"""Scale-out: one and two gateway processes on one port (SO_REUSEPORT), and the outbox across them.

Throughput: the same load generator (``bench.loadgen``, 64 in flight over several channels,
so the kernel has several connections to spread) against one gateway process, then against
two processes bound to the same port, in alternating rounds. Correctness: the tasks accepted
in those rounds, a burst of held EnqueueAt tasks falling due under two relays, and a run in
which one of two processes is SIGKILLed, are audited against the broker queue
(``bench.scaleout_audit``): each task must reach the broker exactly once.

The section uses a database of its own and a Redis key prefix of its own, so rows and
messages of the other sections cannot reach its queue; nothing consumes the queue.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.drive import LoadResult
from bench.enqueue import grpc_command
from bench.infra import (
    OUT,
    Children,
    PrivateDatabase,
    PrivateRedis,
    announce,
    cpu_seconds,
    free_port,
    python_env,
    wait_for_line,
)
from bench.plan import Plan
from bench.scaleout_audit import (
    Dispatch,
    Evidence,
    Kill,
    Run,
    accepted_ids,
    read_queue,
    read_rows,
    report,
    wait_settled,
)
from bench.servers import LOST_QUEUED_OFF, Server, broker_env
from service.usecases.tasks import DISPATCH_LEAD

#: Redis key prefix of this section's gateways: their queue is ``scaleout:celery``.
PREFIX = "scaleout:"
QUEUE = f"{PREFIX}celery"
#: TASKGATE_SCHEDULE_HORIZON of every gateway here, in seconds.
HORIZON = 2
#: TASKGATE_OUTBOX_POLL_INTERVAL of the two gateways of the dispatcher check, in seconds.
DISPATCH_POLL = 0.02
#: TASKGATE_PUBLISH_LEASE of the two gateways of the SIGKILL run, in seconds.
KILL_LEASE = 3
_LISTENING = re.compile(rb"taskgate listening on [^:\s]+:(\d+)")


def _machine_jiffies() -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return fields[3] + fields[4], sum(fields)


class _MachineLoad:
    """Samples /proc/stat on a thread, to tell the busy cores of a past window of a run."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="scaleout-procstat", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.monotonic(), *_machine_jiffies()))
            self._stop.wait(0.1)

    def cores(self, start: float, end: float) -> float:
        """Cores busy machine-wide between two ``time.monotonic()`` instants (NaN if unsampled)."""
        inside = [sample for sample in self._samples if start <= sample[0] <= end]
        if len(inside) < 2:
            return math.nan
        (_, idle0, total0), (_, idle1, total1) = inside[0], inside[-1]
        return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Context:
    plan: Plan
    children: Children
    redis: PrivateRedis
    db: PrivateDatabase
    port: int
    machine: _MachineLoad
    #: pid -> name of every gateway started, for the report
    names: dict[int, str] = field(default_factory=dict)

    def start(self, name: str, **env: str) -> Server:
        """A gateway process on the shared port (log: bench/out/scaleout-<name>.log)."""
        log = OUT / f"scaleout-{name}.log"
        log.write_bytes(b"")
        environment = broker_env(
            self.redis.url,
            DATABASE_URL=self.db.url,
            TASKGATE_LISTEN=f"127.0.0.1:{self.port}",
            TASKGATE_REUSE_PORT="1",
            TASKGATE_KEY_PREFIX=PREFIX,
            TASKGATE_SCHEDULE_HORIZON=str(HORIZON),
            TASKGATE_LOST_QUEUED_AFTER=LOST_QUEUED_OFF,  # see start_taskgate
            **env,
        )
        process = self.children.spawn([sys.executable, "-m", "service", "serve"], log=log, env=environment)
        wait_for_line(process, log, _LISTENING, timeout=60)
        self.names[process.pid] = name
        return Server(name, process, self.port, log)

    def stop(self, server: Server) -> None:
        """SIGTERM: a graceful stop, which publishes and marks what its outbox holds."""
        self.children.stop(server.process, timeout=30)

    def command(self, gateway: Server, duration: float) -> list[str]:
        plan = self.plan
        make = grpc_command(gateway, plan.scaleout_channels)
        return make(plan.throughput_concurrency, plan.warmup, duration)


def _measure(ctx: _Context, gateways: list[Server]) -> Run:
    """One load-generator run against the port, with the CPU every participant spent."""
    plan = ctx.plan
    offsets = [g.log.stat().st_size for g in gateways]
    cpu_before = [cpu_seconds(g.pid) for g in gateways]
    pg_before = ctx.db.backend_cpu()
    redis_before = cpu_seconds(ctx.redis.process.pid)
    started = time.monotonic()
    line = ctx.children.run_json_line(
        ctx.command(gateways[0], plan.throughput_duration),
        log=OUT / "loadgen-scaleout.log",
        env=python_env(),
        timeout=plan.warmup + plan.throughput_duration + 90,
    )
    ended = time.monotonic()
    pg_after = ctx.db.backend_cpu()
    result = LoadResult.from_json(line)
    if result.errors:
        announce(f"scale-out: {result.errors} errors, first: {result.first_error}")
    # the measured window: the last ``duration`` seconds before the load generator's exit, less
    # the drain of the last calls and the interpreter's exit
    window_end = ended - 0.3
    machine = ctx.machine.cores(window_end - plan.throughput_duration + 0.2, window_end)
    return Run(
        procs=len(gateways),
        result=result,
        wall=ended - started,
        gw_cpu=[cpu_seconds(g.pid) - before for g, before in zip(gateways, cpu_before, strict=True)],
        served=[len(accepted_ids(g.log, offset)) for g, offset in zip(gateways, offsets, strict=True)],
        pg_cpu=sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items()),
        redis_cpu=cpu_seconds(ctx.redis.process.pid) - redis_before,
        machine_cores=machine,
    )


def _warm_up(ctx: _Context, gateway: Server) -> int:
    """A short unmeasured run, so no measured run meets a cold process; returns the calls it made."""
    line = ctx.children.run_json_line(
        ctx.command(gateway, 1.0), log=OUT / "loadgen-scaleout.log", env=python_env(), timeout=90
    )
    return LoadResult.from_json(line).total_calls


def _throughput(ctx: _Context, first: Server) -> tuple[list[Run], int]:
    """Alternate 1 process and 2 processes on the port; the second is started for each round.

    Returns:
        The measured runs, and the calls the unmeasured warm-up runs made.
    """
    runs, warm_calls = [], 0
    for round_no in range(1, ctx.plan.rounds + 1):
        announce(f"scale-out round {round_no}/{ctx.plan.rounds}: 1 process")
        if round_no == 1:
            warm_calls += _warm_up(ctx, first)
        runs.append(_measure(ctx, [first]))
        second = ctx.start(f"b{round_no}")
        try:
            warm_calls += _warm_up(ctx, second)
            announce(f"scale-out round {round_no}/{ctx.plan.rounds}: 2 processes")
            runs.append(_measure(ctx, [first, second]))
        finally:
            ctx.stop(second)
    return runs, warm_calls


def _dispatch(ctx: _Context, rate_hint: float) -> Dispatch:
    """EnqueueAt held tasks through two processes, all due at one moment; wait until published.

    Both relays poll every ``DISPATCH_POLL`` seconds, so that they claim the due rows concurrently
    (at the default 0.5 s, one relay usually claims every batch before the other polls).
    """
    poll = str(DISPATCH_POLL)
    gateways = [ctx.start(name, TASKGATE_OUTBOX_POLL_INTERVAL=poll) for name in ("a-held", "b-held")]
    try:
        return _enqueue_held(ctx, gateways, rate_hint)
    finally:
        for gateway in gateways:
            ctx.stop(gateway)


def _enqueue_held(ctx: _Context, gateways: list[Server], rate_hint: float) -> Dispatch:
    plan, n = ctx.plan, ctx.plan.scaleout_held
    lead = max(float(HORIZON), DISPATCH_LEAD.total_seconds())
    # a whole second (exact in PostgreSQL), far enough ahead that every task is held
    run_time = math.ceil(time.time() + lead + 3 + 1.5 * n / max(rate_hint, 100.0))
    offsets = [g.log.stat().st_size for g in gateways]
    announce(f"scale-out dispatcher: EnqueueAt {n} tasks, run_time in {run_time - time.time():.1f}s")
    command = [
        sys.executable, "-m", "bench.loadgen", "--target", gateways[0].target, "--method", "enqueue_at",
        "--concurrency", str(plan.throughput_concurrency), "--total", str(n),
        "--channels", str(plan.scaleout_channels), "--run-time", str(run_time),
    ]  # fmt: skip
    line = ctx.children.run_json_line(
        command, log=OUT / "loadgen-scaleout.log", env=python_env(), timeout=run_time - time.time() + 120
    )
    due = run_time - lead
    margin = due - time.time()
    unsettled = wait_settled(ctx.db.url, deadline=run_time + 60)
    return Dispatch(
        n=n,
        result=LoadResult.from_json(line),
        served=[len(accepted_ids(g.log, offset)) for g, offset in zip(gateways, offsets, strict=True)],
        run_time=dt.datetime.fromtimestamp(run_time, dt.UTC),
        lead=lead,
        poll=DISPATCH_POLL,
        due=due,
        margin=margin,
        unsettled=unsettled,
    )


def _wait_serving(server: Server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if accepted_ids(server.log):
            return True
        time.sleep(0.1)
    return False


def _kill(ctx: _Context) -> Kill:
    """Two processes with a short lease; SIGKILL one half-way through an Enqueue run."""
    plan = ctx.plan
    lease = str(KILL_LEASE)
    survivor = ctx.start("a-kill", TASKGATE_PUBLISH_LEASE=lease)
    victim = ctx.start("b-kill", TASKGATE_PUBLISH_LEASE=lease)
    try:
        duration = max(4.0, 2 * plan.throughput_duration)
        announce(f"scale-out kill: Enqueue for {duration:g}s, SIGKILL of pid {victim.pid} half-way")
        loadgen = ctx.children.spawn(
            ctx.command(survivor, duration),
            log=OUT / "loadgen-scaleout.log",
            env=python_env(),
            stdout_pipe=True,
        )
        served = _wait_serving(victim, timeout=30)
        time.sleep(plan.warmup + duration / 2)
        os.kill(victim.pid, signal.SIGKILL)
        kill_time = time.time()
        victim.process.wait()
        try:
            stdout, _ = loadgen.communicate(timeout=plan.warmup + duration + 90)
        except subprocess.TimeoutExpired:
            ctx.children.stop(loadgen)
            raise
        if loadgen.returncode != 0:
            raise RuntimeError(f"load generator failed (exit {loadgen.returncode}); see loadgen-scaleout.log")
        result = LoadResult.from_json(stdout.decode().strip().splitlines()[-1])
        unsettled = wait_settled(ctx.db.url, deadline=time.time() + KILL_LEASE + 30)
        return Kill(
            result=result,
            kill_time=kill_time,
            lease=KILL_LEASE,
            victim_pid=victim.pid,
            survivor_pid=survivor.pid,
            victim_served_before_kill=served,
            victim_ids=accepted_ids(victim.log),
            survivor_ids=accepted_ids(survivor.log),
            unsettled=unsettled,
        )
    finally:
        ctx.stop(survivor)
        ctx.children.stop(victim.process)


def run_scaleout(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Measure Enqueue through 1 and 2 processes on one port, then audit the outbox across them.

    Args:
        plan: Sizes (rounds, durations, ``scaleout_channels``, ``scaleout_held``).
        children: Where the processes started here are registered.
        redis: The run's private Redis; this section uses its own key prefix there.
        db: The run's database. Not written to: the section migrates a database of its own, so
            rows left unpublished by earlier sections cannot be relayed into its queue.

    Returns:
        The markdown section.
    """
    del db  # see the docstring
    own = PrivateDatabase()
    announce(f"scale-out: creating database {own.name}")
    own.create()
    ctx = _Context(plan, children, redis, own, free_port(), _MachineLoad())
    redis.client.delete(QUEUE)
    try:
        first = ctx.start("a")
        try:
            runs, warm_calls = _throughput(ctx, first)
            settled = wait_settled(own.url, deadline=time.time() + 60)
            phase_a = set(read_rows(own.url))
        finally:
            ctx.stop(first)
        dispatch = _dispatch(ctx, statistics.median(r.result.rate for r in runs if r.procs == 1))
        kill = _kill(ctx)
        announce("scale-out: auditing the database against the broker queue")
        rows, messages = read_rows(own.url), read_queue(redis.client, QUEUE)
        return report(
            plan, Evidence(ctx.names, runs, warm_calls, settled, phase_a, dispatch, kill, rows, messages)
        )
    finally:
        ctx.machine.close()
        redis.client.delete(QUEUE)
        try:
            own.drop()
        except Exception as exc:  # noqa: BLE001 - report it, keep the original error
            announce(f"could not drop database {own.name}: {exc!r}")
