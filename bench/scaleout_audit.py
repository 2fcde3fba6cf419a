"""The scale-out section's evidence and report: what the gateways recorded against the broker.

The database says which tasks were accepted and whether (and how often) a relay claimed
and published each one; the broker queue, which nobody consumes during the bench, holds
every message the gateways published. Each message names its task id, its eta and the
process that published it (Celery's ``origin`` header, ``gen<pid>@<host>``), so a task
published twice, or by which replica, shows up here whatever the database says.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import os
import re
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.drive import LoadResult
from bench.plan import Plan
from service.store.tasks import tasks

_ORIGIN_PID = re.compile(r"^gen(\d+)@")
#: One committed task in a gateway's log: its audit line or its "accepted (…)" line.
_ACCEPTED = re.compile(rb"task_id=([0-9a-f-]{36})\b[^\n]*(?:outcome=accepted|\baccepted \()")


@dataclass(frozen=True)
class Row:
    """The outbox columns of one task."""

    task_id: str
    create_time: dt.datetime
    run_time: dt.datetime
    publish_time: dt.datetime | None
    publish_after: dt.datetime | None
    publish_attempts: int


@dataclass(frozen=True)
class Message:
    """One task message in the broker queue."""

    task_id: str
    #: pid of the process that published it (None: no parsable origin header)
    pid: int | None
    eta: str | None


@dataclass
class Run:
    """One load-generator run against the port and what each participant spent on it."""

    procs: int
    result: LoadResult
    #: seconds the load generator ran (start-up and warm-up included: the window of gw_cpu etc.)
    wall: float
    #: CPU seconds of each gateway process during the run
    gw_cpu: list[float]
    #: calls each gateway process logged as accepted during the run
    served: list[int]
    pg_cpu: float
    redis_cpu: float
    #: cores busy machine-wide during the measured seconds (everything, other users included)
    machine_cores: float

    def per_call(self, cpu: float) -> float:
        """``cpu`` seconds as milliseconds per call of this run."""
        return cpu * 1000 / max(self.result.total_calls, 1)

    @property
    def client_ms(self) -> float:
        return self.result.client_cpu * 1000 / max(self.result.rate, 1e-9)

    @property
    def our_cores(self) -> float:
        """Cores the gateways, PostgreSQL, Redis and the load generator used at the measured rate."""
        server_ms = self.per_call(sum(self.gw_cpu) + self.pg_cpu + self.redis_cpu)
        return server_ms * self.result.rate / 1000 + self.result.client_cpu


@dataclass
class Dispatch:
    """The held-task burst under two relays."""

    n: int
    result: LoadResult
    served: list[int]
    run_time: dt.datetime
    #: seconds before run_time a held task becomes publishable (the horizon, at least DISPATCH_LEAD)
    lead: float
    #: TASKGATE_OUTBOX_POLL_INTERVAL of both relays, in seconds
    poll: float
    #: epoch seconds the tasks became publishable (run_time - lead)
    due: float
    #: seconds enqueueing finished before ``due``
    margin: float
    unsettled: int


@dataclass
class Kill:
    """The run in which one of two processes was SIGKILLed."""

    result: LoadResult
    kill_time: float
    lease: float
    victim_pid: int
    survivor_pid: int
    victim_served_before_kill: bool
    #: tasks the victim logged as accepted (committed) before it died
    victim_ids: set[str]
    #: tasks the survivor logged as accepted
    survivor_ids: set[str]
    unsettled: int


async def _rows(url: str) -> dict[str, Row]:
    engine = create_async_engine(url, poolclass=NullPool)
    columns = [
        tasks.c.task_id, tasks.c.create_time, tasks.c.run_time,
        tasks.c.publish_time, tasks.c.publish_after, tasks.c.publish_attempts,
    ]  # fmt: skip
    try:
        async with engine.connect() as conn:
            result = await conn.execute(sa.select(*columns))
            return {row.task_id: Row(*row) for row in result}
    finally:
        await engine.dispose()


def read_rows(url: str) -> dict[str, Row]:
    """Every task of the database at ``url``, by id."""
    return asyncio.run(_rows(url))


async def _unsettled(url: str, deadline: float) -> int:
    engine = create_async_engine(url, poolclass=NullPool)
    query = sa.select(sa.func.count()).select_from(tasks).where(tasks.c.publish_after.isnot(None))
    try:
        async with engine.connect() as conn:
            while True:
                pending = int(await conn.scalar(query) or 0)
                await conn.rollback()
                if pending == 0 or time.time() >= deadline:
                    return pending
                await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


def wait_settled(url: str, deadline: float) -> int:
    """Wait until no task still has an outbox mark; return how many still do at ``deadline``."""
    return asyncio.run(_unsettled(url, deadline))


def read_queue(client: redis.Redis, key: str) -> list[Message]:
    """Every message in the broker list ``key`` (Celery protocol 2 on kombu's Redis transport)."""
    messages = []
    for raw in cast(list[bytes], client.lrange(key, 0, -1)):
        headers = json.loads(raw)["headers"]
        match = _ORIGIN_PID.match(str(headers.get("origin") or ""))
        pid = int(match.group(1)) if match else None
        messages.append(Message(headers["id"], pid, headers.get("eta")))
    return messages


def accepted_ids(log: Path, offset: int = 0) -> set[str]:
    """Ids of the tasks a gateway logged as accepted (committed) after byte ``offset`` of its log."""
    with log.open("rb") as file:
        file.seek(offset)
        return {match.group(1).decode() for match in _ACCEPTED.finditer(file.read())}


@dataclass
class Audit:
    """One set of tasks checked against the database and the broker queue."""

    rows: int
    #: tasks without publish_time, or still carrying an outbox mark
    unpublished: int
    #: publish_attempts -> tasks
    attempts: collections.Counter[int]
    #: tasks with no message in the broker
    missing: list[str]
    #: task id -> pids that published it, for tasks with more than one message
    duplicated: dict[str, list[int | None]]
    #: publishing pid -> messages of these tasks
    publishers: collections.Counter[int | None] = field(default_factory=collections.Counter)

    @property
    def messages(self) -> int:
        return sum(self.publishers.values())

    @property
    def exactly_once(self) -> bool:
        """Every task published and in the broker exactly once."""
        return self.unpublished == 0 and not self.missing and not self.duplicated


def audit(rows: Mapping[str, Row], ids: Iterable[str], messages: Iterable[Message]) -> Audit:
    """Check the tasks ``ids`` (all in ``rows``) against the broker ``messages``."""
    wanted = set(ids)
    by_id: dict[str, list[int | None]] = collections.defaultdict(list)
    publishers: collections.Counter[int | None] = collections.Counter()
    for message in messages:
        if message.task_id in wanted:
            by_id[message.task_id].append(message.pid)
            publishers[message.pid] += 1
    selected = [rows[task_id] for task_id in wanted]
    return Audit(
        rows=len(selected),
        unpublished=sum(1 for r in selected if r.publish_time is None or r.publish_after is not None),
        attempts=collections.Counter(r.publish_attempts for r in selected),
        missing=sorted(task_id for task_id in wanted if task_id not in by_id),
        duplicated={task_id: pids for task_id, pids in by_id.items() if len(pids) > 1},
        publishers=publishers,
    )


def strays(rows: Mapping[str, Row], messages: Iterable[Message]) -> int:
    """Messages whose task is not in the database at all."""
    return sum(1 for message in messages if message.task_id not in rows)


# --- report ----------------------------------------------------------------------------


@dataclass
class Evidence:
    """Everything the report needs; the rows and the queue are read after every gateway stopped."""

    names: dict[int, str]
    runs: list[Run]
    #: calls of the unmeasured warm-up runs (their tasks are audited too)
    warm_calls: int
    #: rows still carrying an outbox mark when the throughput rounds had settled
    settled: int
    #: ids of the tasks of the throughput rounds
    phase_a: set[str]
    dispatch: Dispatch
    kill: Kill
    rows: dict[str, Row]
    messages: list[Message]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _who(names: Mapping[int, str], counts: Mapping[int | None, int]) -> str:
    parts = [f"{names.get(pid, f'pid {pid}') if pid is not None else '?'} {n}" for pid, n in counts.items()]
    return ", ".join(sorted(parts)) or "none"


def _hist(counter: Mapping[int, int]) -> str:
    return "{" + ", ".join(f"{k}: {counter[k]}" for k in sorted(counter)) + "}"


def _run_line(round_no: int, run: Run, names: list[str]) -> str:
    r = run.result
    shares = " / ".join(f"{name} {count}" for name, count in zip(names, run.served, strict=True))
    per_proc = " / ".join(
        f"{name} {cpu * 1000 / count:.3f}" if count else f"{name} —"
        for name, cpu, count in zip(names, run.gw_cpu, run.served, strict=True)
    )
    return (
        f"{round_no:>5} {run.procs:>5} {r.rate:>8.0f} {r.p50:>7.1f} {r.p99:>7.1f} {r.errors:>6}  "
        f"{shares:<22} {per_proc:<24} {run.per_call(sum(run.gw_cpu)):>7.3f} "
        f"{run.per_call(run.pg_cpu):>7.3f} {run.per_call(run.redis_cpu):>6.3f} {run.client_ms:>6.3f} "
        f"{run.our_cores:>5.2f} / {run.machine_cores:.2f}"
    )


@dataclass
class _Medians:
    rate: float
    rate_min: float
    rate_max: float
    gw_ms: float
    pg_ms: float
    redis_ms: float
    client_ms: float
    our_cores: float
    machine_cores: float
    client_cores: float

    @property
    def total_ms(self) -> float:
        return self.gw_ms + self.pg_ms + self.redis_ms + self.client_ms


def _medians(runs: list[Run]) -> _Medians:
    med = statistics.median
    rates = [r.result.rate for r in runs]
    return _Medians(
        rate=med(rates),
        rate_min=min(rates),
        rate_max=max(rates),
        gw_ms=med(r.per_call(sum(r.gw_cpu)) for r in runs),
        pg_ms=med(r.per_call(r.pg_cpu) for r in runs),
        redis_ms=med(r.per_call(r.redis_cpu) for r in runs),
        client_ms=med(r.client_ms for r in runs),
        our_cores=med(r.our_cores for r in runs),
        machine_cores=med(r.machine_cores for r in runs),
        client_cores=med(r.result.client_cpu for r in runs),
    )


def _gateway_cores(run: Run) -> str:
    return " + ".join(f"{run.per_call(cpu) * run.result.rate / 1000:.2f}" for cpu in run.gw_cpu)


def _limits(runs: list[Run], cpus: int) -> list[str]:
    """What bounds the 2-process rate, said from the numbers."""
    one = _medians([r for r in runs if r.procs == 1])
    two = _medians([r for r in runs if r.procs == 2])

    def bound(procs: int, cores: int) -> float:
        """Calls/s CPU allows at the cheapest round's costs (CPU per call varies with what else runs):
        each gateway process at most one core (one event loop), everything at most ``cores``."""
        best = min((r for r in runs if r.procs == procs), key=lambda r: r.per_call(sum(r.gw_cpu)))
        gw_ms = best.per_call(sum(best.gw_cpu))
        total_ms = gw_ms + best.per_call(best.pg_cpu + best.redis_cpu) + best.client_ms
        return min(procs * 1000 / max(gw_ms, 1e-9), cores * 1000 / max(total_ms, 1e-9))

    allowed = bound(2, cpus) / bound(1, cpus)
    measured = two.rate / max(one.rate, 1e-9)
    lines = [
        f"CPU per call (ms)      : gateway {one.gw_ms:.3f} -> {two.gw_ms:.3f}, "
        f"PostgreSQL {one.pg_ms:.3f} -> {two.pg_ms:.3f}, Redis {one.redis_ms:.3f} -> {two.redis_ms:.3f}, "
        f"load generator {one.client_ms:.3f} -> {two.client_ms:.3f} (1 -> 2 processes, medians)",
        f"cores busy             : 1 process {one.our_cores:.2f} ours / {one.machine_cores:.2f} "
        f"machine-wide; 2 processes {two.our_cores:.2f} / {two.machine_cores:.2f}, of {cpus} cores",
        "gateway cores by round : "
        + ", ".join(f"{r.procs}p {_gateway_cores(r)}" for r in runs)
        + " (one process cannot use more than about 1)",
        f"CPU bound              : with the machine to itself, at the cheapest round's CPU per call, "
        f"1 process <= {bound(1, cpus):.0f} calls/s, 2 processes <= {bound(2, cpus):.0f}: at most "
        f"{allowed:.2f}x on {cpus} cores ({bound(2, 4) / bound(1, 4):.2f}x on 4)",
    ]
    others = two.machine_cores - two.our_cores
    if measured > 1.15 * allowed:
        verdict = (
            f"the measured {measured:.2f}x is above what CPU allows ({allowed:.2f}x): the 1-process rounds "
            f"were slowed by other work on the machine ({one.machine_cores - one.our_cores:.2f} cores not "
            f"ours, against {others:.2f} in the 2-process rounds). Compare the ratio over several runs."
        )
    elif two.machine_cores >= 0.9 * cpus:
        verdict = (
            f"the {cpus} cores were saturated, {others:.2f} of them by processes outside this measurement "
            "(other benchmarks and test runs, PostgreSQL's own background work). One gateway process "
            "is bound by its one core; a second one can only take CPU from PostgreSQL, Redis and the "
            "load generator on the same cores, so the ratio measures this machine; the CPU bound on 4 "
            "cores is what a machine with spare cores would allow."
        )
    elif two.client_cores >= 0.9:
        verdict = "the load generator (one asyncio process) used about a whole core: it is the limit."
    else:
        verdict = (
            f"the cores were not saturated ({two.machine_cores:.2f} of {cpus}); the rate is bounded by "
            "waiting (database commits, the broker), not by CPU."
        )
    return [*lines, f"verdict                : {verdict}"]


def _throughput(plan: Plan, ev: Evidence) -> list[str]:
    channels = plan.scaleout_channels
    lines = [
        "## Scale-out: 1 and 2 gateway processes on one port (SO_REUSEPORT)",
        "",
        f"bench.loadgen, Enqueue demo.add, {plan.throughput_concurrency} in flight over {channels} channels "
        f"({channels} TCP connections, which the kernel spreads over the processes bound to the port), "
        f"{plan.throughput_duration:g}s after {plan.warmup:g}s warm-up; rounds alternate 1 and 2 processes "
        "(process a serves both; b<round> is started for its round and stopped with SIGTERM after it).",
        "",
        f"{'round':>5} {'procs':>5} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  "
        f"{'calls served':<22} {'gw CPU ms/call served':<24} {'gw all':>7} {'PG':>7} {'redis':>6} "
        f"{'client':>6} {'cores ours / machine':>5}",
        f"{'':>5} {'':>5} {'':>8} {'':>7} {'':>7} {'':>6}  {'(per process)':<22} {'(per process)':<24} "
        f"{'ms/call':>7} {'ms/call':>7} {'ms/c':>6} {'ms/c':>6}",
    ]
    for index, run in enumerate(ev.runs):
        names = ["a"] + ([f"b{index // 2 + 1}"] if run.procs == 2 else [])
        lines.append(_run_line(index // 2 + 1, run, names))
    one = _medians([r for r in ev.runs if r.procs == 1])
    two = _medians([r for r in ev.runs if r.procs == 2])
    both_served = all(all(r.served) for r in ev.runs if r.procs == 2)
    lines += [
        "",
        f"median calls/s         : 1 process {one.rate:.0f} ({one.rate_min:.0f}-{one.rate_max:.0f}), "
        f"2 processes {two.rate:.0f} ({two.rate_min:.0f}-{two.rate_max:.0f})",
        f"**2 processes / 1**    : **{two.rate / max(one.rate, 1e-9):.2f}x**",
        "both processes served  : "
        + ("yes, in every 2-process round" if both_served else "NO, see calls served")
        + " (calls counted from each process's log)",
    ]
    return [*lines, *_limits(ev.runs, os.cpu_count() or 1)]


def _eta_is(message: Message, run_time: dt.datetime) -> bool:
    try:
        return message.eta is not None and dt.datetime.fromisoformat(message.eta) == run_time
    except ValueError:
        return False


def _check_enqueue(ev: Evidence) -> tuple[bool, list[str]]:
    a = audit(ev.rows, ev.phase_a, ev.messages)
    accepted = sum(r.result.total_calls for r in ev.runs) + ev.warm_calls
    errors = sum(r.result.errors for r in ev.runs)
    ok = accepted <= a.rows <= accepted + errors and a.exactly_once and max(a.attempts, default=0) <= 1
    ok = ok and ev.settled == 0
    return ok, [
        f"(a) Enqueue rounds: every accepted task recorded once, published once  {_verdict(ok)}",
        f"    calls accepted {accepted} (warm-up runs included; {errors} errors); rows {a.rows}; "
        f"still marked after the rounds {ev.settled}; unpublished {a.unpublished}",
        f"    publish_attempts {_hist(a.attempts)} (0 = published by the fast path of the process that "
        "accepted it, 1 = claimed once by a relay)",
        f"    broker: {a.messages} messages for these rows, {len(a.missing)} rows without one, "
        f"{len(a.duplicated)} rows with more than one; published by {_who(ev.names, a.publishers)}",
    ]


def _check_dispatch(ev: Evidence) -> tuple[bool, list[str]]:
    d = ev.dispatch
    ids = {r.task_id for r in ev.rows.values() if r.run_time == d.run_time}
    b = audit(ev.rows, ids, ev.messages)
    etas = sum(1 for m in ev.messages if m.task_id in ids and _eta_is(m, d.run_time))
    times = sorted(t.timestamp() for i in ids if (t := ev.rows[i].publish_time) is not None)
    early = sum(1 for t in times if t < d.due - 0.001)
    once = b.attempts == collections.Counter({1: d.n})
    ok = b.rows == d.n == d.result.completed and b.exactly_once and once and etas == b.messages
    ok = ok and early == 0 and all(d.served) and d.unsettled == 0
    lag = f"first {times[0] - d.due:.2f} s, last {times[-1] - d.due:.2f} s" if times else "—"
    return ok, [
        f"(b) dispatcher: {d.n} held EnqueueAt tasks due at one moment, two relays polling every "
        f"{d.poll:g} s  {_verdict(ok)}",
        f"    EnqueueAt calls: {d.result.completed} ok, {d.result.errors} errors, "
        f"served a-held {d.served[0]} / b-held {d.served[1]}; "
        f"enqueueing finished {d.margin:.1f} s before they became publishable",
        f"    rows {b.rows}, unpublished {b.unpublished}, "
        f"publish_attempts {_hist(b.attempts)} (all 1 expected)",
        f"    broker: {b.messages} messages, {len(b.missing)} rows without one, "
        f"{len(b.duplicated)} with more than one, {etas} with eta = run_time; "
        f"published by {_who(ev.names, b.publishers)}",
        f"    publish_time - publishable time (run_time - {d.lead:g} s): {lag}; {early} published early",
    ]


def _check_kill(ev: Evidence) -> tuple[bool, list[str]]:
    k = ev.kill
    held = {r.task_id for r in ev.rows.values() if r.run_time == ev.dispatch.run_time}
    ids = set(ev.rows) - ev.phase_a - held
    c = audit(ev.rows, ids, ev.messages)
    # every row of this run was committed by one of the two; the survivor's log is complete
    victim = ids - k.survivor_ids
    publishers: dict[str, set[int | None]] = collections.defaultdict(set)
    for message in ev.messages:
        if message.task_id in victim:
            publishers[message.task_id].add(message.pid)
    itself = {i for i, pids in publishers.items() if pids == {k.victim_pid}}
    both = {i for i, pids in publishers.items() if pids == {k.victim_pid, k.survivor_pid}}
    relayed = {i for i, pids in publishers.items() if pids == {k.survivor_pid}}
    unexpected = set(c.duplicated) - both
    late = [t.timestamp() - k.kill_time for i in both | relayed if (t := ev.rows[i].publish_time) is not None]
    accepted = k.result.total_calls
    ok = not c.missing and c.unpublished == 0 and not unexpected and c.rows >= accepted and k.unsettled == 0
    return ok, [
        f"(c) SIGKILL of one of two processes (TASKGATE_PUBLISH_LEASE={k.lease:g}): none lost  "
        + _verdict(ok),
        f"    Enqueue calls {accepted} ok, {k.result.errors} failed (the killed process's connections); "
        f"rows {c.rows}; unpublished {c.unpublished}; rows without a broker message {len(c.missing)}",
        f"    rows the killed process committed: {len(victim)} ({len(k.victim_ids)} in its log"
        + ("" if k.victim_served_before_kill else "; it had served nothing when killed")
        + f"): {len(itself)} published by it alone, {len(relayed)} published only by the survivor's relay, "
        f"{len(both)} by both",
        f"    survivor's relay published the last of them {max(late):.2f} s after the kill"
        if late
        else "    survivor's relay had nothing of the killed process's to publish",
        f"    duplicates: {len(both)} expected (the killed process pushed them and died before marking "
        f"them published; the relay sent them again after the lease), {len(unexpected)} unexpected; "
        f"publish_attempts {_hist(c.attempts)}",
    ]


def report(plan: Plan, ev: Evidence) -> str:
    """The section: the throughput table, then each check with its evidence and verdict."""
    checks = [_check_enqueue(ev), _check_dispatch(ev), _check_kill(ev)]
    stray = strays(ev.rows, ev.messages)
    lines = [*_throughput(plan, ev), "", "### Correctness across processes", ""]
    for _, check_lines in checks:
        lines += check_lines
    lines += [
        f"(d) broker messages of tasks not in the database: {stray}  {_verdict(stray == 0)}",
        "",
        f"All checks: {_verdict(all(ok for ok, _ in checks) and stray == 0)}. The queue "
        f"({len(ev.messages)} messages) is read once after every gateway stopped, so a late second publish "
        "of any task shows up; processes: "
        + ", ".join(f"{name} = pid {pid}" for pid, name in ev.names.items()),
    ]
    return "\n".join(lines)
