"""Measurement 4: N concurrent StreamProgress streams on one gateway process.

A gateway of its own (Redis key prefix ``bstreams-``) gets N tasks on a queue no worker
consumes; client processes open one stream per task; then a writer process stores, through
a real Celery app's Redis result backend, one PROGRESS and then one SUCCESS per task at a
steady rate, each stamped with its send time. A raw ``redis.asyncio`` PSUBSCRIBE client in
its own process times the same messages: the baseline of the delivery delay. Every clock
read is CLOCK_MONOTONIC (Python's ``time.monotonic()``, Node's ``process.hrtime``), one
clock for every process on the machine.

It runs twice, each time on a fresh gateway with its own raw baseline: with clients in Node
(``bench/node/streamclient.js``, @grpc/grpc-js: one thread reads each message off its
socket) and with clients in Python (``bench/streamclient.py``, grpc.aio: each message
crosses three threads of the client's before the program sees it: gRPC's event engine,
its completion-queue poller, the asyncio loop). The delay target is judged on the Node run,
whose client adds least of its own; the Python run is reported beside it.

Reported: streams opened, the gateway's Redis connections (its TCP connections to the Redis
port, read from /proc), its RSS before and after opening the streams and its CPU time, how
many streams saw the terminal update, delivery delays through taskgate against raw pub/sub,
and the gateway's event-loop stalls (``service.runtime.loopwatch``, reported on SIGUSR1).

The clients open at most 200 streams at a time each: gRPC core cancels new calls the server
has not picked up yet once more than 1,000 are queued (``grpc.server.max_pending_requests``),
so a burst of thousands of calls started at once would measure that instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.drive import percentile
from bench.infra import OUT, Children, PrivateDatabase, PrivateRedis, announce, cpu_seconds, python_env
from bench.nodejs import node_command, require_node
from bench.plan import Plan
from bench.procstat import redis_clients_by_port, rss_kb, tcp_connections
from bench.servers import Server, broker_env, start_taskgate
from bench.stalls import MAX_STALL_MS, Stalls, stall_report

KEY_PREFIX = "bstreams-"
QUEUE = "bench-streams"
#: PROGRESS and SUCCESS writes per second (each phase: N writes at this rate).
RATE = 1000.0
CLIENT_PROCESSES = 2
CHANNELS_PER_CLIENT = 4
#: The targets of the issue.
MAX_CONNECTIONS = 8
MAX_KB_PER_STREAM = 30.0
MAX_DELAY_RATIO = 2.0

Client = Literal["node", "python"]
#: The client of each run, in order; the delay target is judged on the first.
CLIENTS: tuple[Client, ...] = ("node", "python")
CLIENT_LABEL = {"node": "Node @grpc/grpc-js", "python": "Python grpc.aio"}


class ConnectionSampler(threading.Thread):
    """Counts the gateway's TCP connections to Redis every ``interval`` seconds; keeps the max."""

    def __init__(self, pid: int, port: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="connection-sampler")
        self.pid, self.port, self.interval = pid, port, interval
        self.most = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        try:
            count = len(tcp_connections(self.pid, self.port))
        except OSError:
            return 0
        self.most = max(self.most, count)
        return count

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class Outcome:
    """Everything one run measured."""

    n: int
    client: Client = "node"
    work: Path = OUT
    opened: int = 0
    open_failed: int = 0
    open_seconds: float = 0.0
    rss_before_kb: int = 0
    rss_open_kb: int = 0
    #: gateway CPU seconds opening the streams, share of a core while they sat idle (2 s), and
    #: CPU seconds from the first update to the last stream's end
    cpu_open_s: float = 0.0
    cpu_idle_share: float = 0.0
    cpu_updates_s: float = 0.0
    connections_open: list[int] = field(default_factory=list)
    connection_names: list[str] = field(default_factory=list)
    connections_max: int = 0
    terminal: int = 0
    stream_errors: int = 0
    first_error: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    taskgate_ms: dict[str, list[float]] = field(default_factory=dict)
    raw_ms: dict[str, list[float]] = field(default_factory=dict)
    #: the clients' own garbage-collection pauses while updates arrived (Node clients only)
    client_gc_ms: list[float] = field(default_factory=list)
    stalls_open: Stalls | None = None
    stalls_updates: Stalls | None = None


def _enqueue(children: Children, server: Server, n: int, work: Path) -> list[str]:
    ids_file = work / "ids.txt"
    command = [
        sys.executable, "-m", "bench.streamclient", "enqueue", "--target", server.target,
        "--ids", str(ids_file), "--count", str(n), "--queue", QUEUE,
    ]  # fmt: skip
    children.run_json_line(command, log=work / "enqueue.log", env=python_env(), timeout=n / 20 + 60)
    return ids_file.read_text().split()


def _client_command(client: Client, server: Server, ids_file: Path, n: int) -> list[str]:
    options = [
        "--target", server.target, "--ids", str(ids_file), "--channels", str(CHANNELS_PER_CLIENT),
        "--timeout", str(2 * n / RATE + 300),
    ]  # fmt: skip
    if client == "node":
        return node_command("streamclient.js", *options)
    return [sys.executable, "-m", "bench.streamclient", "watch", *options]


def _spawn_clients(
    children: Children, server: Server, ids: list[str], client: Client, work: Path
) -> list[subprocess.Popen[bytes]]:
    clients = []
    for k in range(CLIENT_PROCESSES):
        part = work / f"ids-{k}.txt"
        part.write_text("".join(f"{task_id}\n" for task_id in ids[k::CLIENT_PROCESSES]))
        command = _client_command(client, server, part, len(ids))
        log = work / f"client-{k}.log"
        clients.append(children.spawn(command, log=log, env=python_env(), stdout_pipe=True))
    return clients


def _read_line(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line:
        raise RuntimeError(f"{str(process.args)[:160]} exited with {process.wait()}")
    return line


def _finish(children: Children, process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    try:
        stdout, _ = process.communicate(timeout=timeout)
    finally:
        children.stop(process)
    lines = stdout.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"{str(process.args)[:160]} printed nothing (exit {process.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _open_streams(
    children: Children, server: Server, ids: list[str], outcome: Outcome, work: Path
) -> list[subprocess.Popen[bytes]]:
    started = time.monotonic()
    clients = _spawn_clients(children, server, ids, outcome.client, work)
    for client in clients:
        _, opened, failed = _read_line(client).split()
        outcome.opened += int(opened)
        outcome.open_failed += int(failed)
    outcome.open_seconds = time.monotonic() - started
    return clients


def run_streams(plan: Plan, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> str:
    """Open ``plan.streams`` streams on one gateway, push two updates through each, report;
    once with each client in ``CLIENTS``."""
    require_node()  # before anything starts: without Node the section stops at once
    reports = [
        report(measure(plan.streams, client, children, redis, db), delay_target=i == 0)
        for i, client in enumerate(CLIENTS)
    ]
    return "\n\n".join(reports)


def measure(n: int, client: Client, children: Children, redis: PrivateRedis, db: PrivateDatabase) -> Outcome:
    """Open ``n`` streams from ``client`` processes on a fresh gateway, push two updates through each."""
    outcome = Outcome(n, client)
    announce(
        f"streams ({CLIENT_LABEL[client]} clients): starting a gateway; enqueueing {n} tasks on "
        f"{QUEUE!r} (no worker listens)"
    )
    # every file of this run in a directory of its own: concurrent bench runs share OUT
    work = Path(tempfile.mkdtemp(prefix=f"streams-{client}-", dir=OUT))
    outcome.work = work
    server = start_taskgate(
        children, redis.url, db.url, log_name=f"{work.name}/taskgate.log", TASKGATE_KEY_PREFIX=KEY_PREFIX,
        TASKGATE_MAX_STREAMS=str(max(n, 10_000)),
    )  # fmt: skip
    sampler = ConnectionSampler(server.pid, redis.port)
    try:
        ids = _enqueue(children, server, n, work)
        time.sleep(2)  # let the outbox publish the last batch
        raw_command = [
            sys.executable, "-m", "bench.streamraw", "--url", redis.url,
            "--pattern", f"{KEY_PREFIX}celery-task-meta-*", "--expect", str(2 * len(ids)),
            "--timeout", str(2 * len(ids) / RATE + 300),
        ]  # fmt: skip
        raw = children.spawn(raw_command, log=work / "raw.log", env=python_env(), stdout_pipe=True)
        _read_line(raw)  # "ready": subscribed
        sampler.start()
        stall_report(server)  # start a fresh window
        outcome.rss_before_kb = rss_kb(server.pid)
        cpu_start = cpu_seconds(server.pid)
        announce(f"streams: opening {len(ids)} streams from {CLIENT_PROCESSES} processes")
        clients = _open_streams(children, server, ids, outcome, work)
        outcome.stalls_open = stall_report(server)
        cpu_open = cpu_seconds(server.pid)
        outcome.cpu_open_s = cpu_open - cpu_start
        time.sleep(2)
        outcome.rss_open_kb = rss_kb(server.pid)
        outcome.connections_open = tcp_connections(server.pid, redis.port)
        outcome.connection_names = redis_clients_by_port(redis.client, outcome.connections_open)
        announce(
            f"streams: {outcome.opened} open in {outcome.open_seconds:.1f}s; writing PROGRESS then "
            f"SUCCESS at {RATE:.0f}/s"
        )
        cpu_idle = cpu_seconds(server.pid)
        outcome.cpu_idle_share = (cpu_idle - cpu_open) / 2
        writer_command = [sys.executable, "-m", "bench.streamwriter", "--ids", str(work / "ids.txt"),
                          "--rate", str(RATE), "--queue", QUEUE]  # fmt: skip
        line = children.run_json_line(
            writer_command,
            log=work / "writer.log",
            env=broker_env(redis.url, TASKGATE_KEY_PREFIX=KEY_PREFIX),
            timeout=2 * len(ids) / RATE + 120,
        )
        outcome.writer = json.loads(line)
        for process in clients:
            tally = _finish(children, process, timeout=120)
            outcome.terminal += tally["terminal"]
            outcome.stream_errors += tally["errors"]
            outcome.first_error = outcome.first_error or tally["first_error"]
            for kind in ("progress", "success"):
                outcome.taskgate_ms.setdefault(kind, []).extend(tally[f"{kind}_ms"])
            outcome.client_gc_ms.extend(tally.get("gc_pauses_ms", []))
        outcome.stalls_updates = stall_report(server)
        outcome.cpu_updates_s = cpu_seconds(server.pid) - cpu_idle
        outcome.raw_ms = _finish(children, raw, timeout=60)
    finally:
        if sampler.is_alive():
            sampler.stop()
        outcome.connections_max = sampler.most
        children.stop(server.process)
    return outcome


# --- report ----------------------------------------------------------------------------


def _summary(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return percentile(ordered, 50), percentile(ordered, 99), ordered[-1] if ordered else float("nan")


def _stalls(stalls: Stalls | None) -> str:
    return stalls.text() if stalls is not None else "? (no report in the gateway's log)"


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report(o: Outcome, *, delay_target: bool = True) -> str:
    """The markdown section for ``o``; ``delay_target``: judge its p99 delay against the target."""
    per_stream = (o.rss_open_kb - o.rss_before_kb) / max(o.opened, 1)
    tg_all = o.taskgate_ms.get("progress", []) + o.taskgate_ms.get("success", [])
    raw_all = o.raw_ms.get("progress", []) + o.raw_ms.get("success", [])

    def rate(phase: str) -> str:
        return str(o.writer.get(phase, {}).get("rate", "?"))

    lines = [
        f"## 4{'ab'[CLIENTS.index(o.client)]}. {o.n} concurrent StreamProgress streams on one gateway "
        f"process, {CLIENT_LABEL[o.client]} clients",
        "",
        f"{CLIENT_PROCESSES} client processes x {CHANNELS_PER_CLIENT} channels; the writer stores one "
        "PROGRESS then one SUCCESS per task",
        f"through the workers app's result backend at {RATE:.0f}/s (achieved: progress {rate('progress')}/s, "
        f"success {rate('success')}/s).",
        "",
        f"streams opened          : {o.opened} of {o.n} in {o.open_seconds:.1f} s ({o.open_failed} failed), "
        f"{o.n // (CLIENT_PROCESSES * CHANNELS_PER_CLIENT)} per HTTP/2 connection",
        f"Redis connections       : {len(o.connections_open)} with all streams open, at most "
        f"{o.connections_max} during the run (TCP connections to the Redis port in /proc)",
        f"  CLIENT LIST names     : {', '.join(name or '(unnamed)' for name in o.connection_names)}",
        f"gateway RSS             : {o.rss_before_kb / 1024:.1f} MB before, "
        f"{o.rss_open_kb / 1024:.1f} MB with the streams open -> {per_stream:.1f} KB per stream",
        f"gateway CPU             : {o.cpu_open_s * 1000 / max(o.opened, 1):.2f} ms per stream opened, "
        f"{o.cpu_idle_share:.1%} of a core with them all open and quiet, "
        f"{o.cpu_updates_s * 1000 / max(2 * o.opened, 1):.3f} ms per update delivered",
        f"terminal update received: {o.terminal} of {o.opened} streams "
        f"({o.stream_errors} stream errors{': ' + o.first_error if o.first_error else ''})",
        "",
        f"{'delivery delay (ms)':<26} {'n':>6} {'p50':>8} {'p99':>8} {'max':>8}",
    ]
    for label, values in (
        ("taskgate, PROGRESS", o.taskgate_ms.get("progress", [])),
        ("taskgate, SUCCESS", o.taskgate_ms.get("success", [])),
        ("taskgate, all", tg_all),
        ("raw pub/sub, all", raw_all),
    ):
        p50, p99, top = _summary(values)
        lines.append(f"{label:<26} {len(values):>6} {p50:>8.2f} {p99:>8.2f} {top:>8.2f}")
    tg_p99, raw_p99 = _summary(tg_all)[1], _summary(raw_all)[1]
    ratio = tg_p99 / raw_p99 if raw_p99 > 0 else float("nan")
    if o.client_gc_ms:
        lines.append(
            f"{'(client GC pauses)':<26} {len(o.client_gc_ms):>6} {'':>8} {'':>8} {max(o.client_gc_ms):>8.2f}"
        )
    lines += [
        f"p99 taskgate / raw      : {ratio:.2f}x",
        "",
        "(delay = a client's receive time - the writer's clock just before store_result, both",
        "CLOCK_MONOTONIC; taskgate's path is Redis -> gateway -> gRPC -> client process, the baseline's",
        "Redis -> one PSUBSCRIBE process)",
        "",
        f"gateway event-loop stalls, opening the streams : {_stalls(o.stalls_open)}",
        f"gateway event-loop stalls, updates and endings : {_stalls(o.stalls_updates)}",
        "(a stall is how late a 5 ms timer fires, service/runtime/loopwatch.py; 'running' counts only the",
        "time the loop's thread was on a CPU; a full GC is CPython's stop-the-world pass over every",
        "tracked object)",
        f"logs: {o.work.relative_to(OUT.parent.parent)}/",
        "",
    ]
    windows = [s for s in (o.stalls_open, o.stalls_updates) if s]
    stall_max = max((s.max_ms for s in windows), default=float("inf"))
    busy_max = max((s.busy_max_ms for s in windows), default=float("inf"))
    checks = [
        (
            f"<= {MAX_CONNECTIONS} Redis connections",
            max(o.connections_max, len(o.connections_open)) <= MAX_CONNECTIONS,
        ),
        (f"<= {MAX_KB_PER_STREAM:g} KB per stream", per_stream <= MAX_KB_PER_STREAM),
        ("every stream got the terminal update", o.opened == o.n and o.terminal == o.opened),
    ]
    if delay_target:
        checks.append((f"p99 delay <= {MAX_DELAY_RATIO:g}x raw pub/sub", ratio <= MAX_DELAY_RATIO))
    else:
        lines.append(
            f"(the p99 delay target is judged in section 4a, with {CLIENT_LABEL[CLIENTS[0]]} clients; "
            f"here {ratio:.2f}x, reported)"
        )
    checks += [
        (f"max event-loop stall <= {MAX_STALL_MS:g} ms", stall_max <= MAX_STALL_MS),
        ("  counting the loop's own running only", busy_max <= MAX_STALL_MS),
    ]
    lines += [f"target {label:<38}: {_verdict(ok)}" for label, ok in checks]
    return "\n".join(lines)
