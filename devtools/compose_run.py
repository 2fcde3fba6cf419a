"""Running the start check's launches: one-shots to completion, then the rest side by side.

A one-shot service passes when it exits 0. Any other passes when its healthcheck succeeds
(polled every second, up to its start_period + interval * retries, at most a minute) or, without
a healthcheck, when it is still running after ``settle`` seconds; and it must still be running
when every service has been judged. Then each is stopped (SIGTERM to its process group, SIGKILL
after a grace period). A failure prints the end of the service's output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devtools.compose_file import ComposeError, Report, load
from devtools.compose_start import Launch, plan, private_stack

#: Seconds a one-shot service may take.
ONESHOT_TIMEOUT = 120.0
#: Seconds a stopped service gets between SIGTERM and SIGKILL (how it stops is not checked;
#: an idle gateway takes its whole TASKGATE_SHUTDOWN_GRACE and more).
STOP_GRACE = 5.0
#: Lines of a failed service's output shown.
TAIL_LINES = 15


@dataclass
class Running:
    """A started launch and what is known about it."""

    launch: Launch
    process: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)
    verdict: str | None = None
    last_probe: float = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.started


def tail(log: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, indented under the FAIL line."""
    text = log.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()[-lines:]
    return "".join(f"\n        | {line}" for line in text) or "\n        | (no output)"


def start(item: Launch, home: Path) -> Running:
    """Start ``item`` in its own process group, output to ``home/<name>.log``."""
    log = home / f"{item.name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            item.argv,
            cwd=item.env["HOME"],
            env=item.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Running(item, process, log)


def _signal(running: Running, sig: signal.Signals) -> None:
    if running.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, sig)


def stop(started: list[Running]) -> list[str]:
    """SIGTERM every process group at once, then SIGKILL those still running after the grace.

    Returns:
        The names of the services that had to be killed.
    """
    killed: list[str] = []
    for running in started:
        _signal(running, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for running in started:
        try:
            running.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(running, signal.SIGKILL)
            running.process.wait()
            killed.append(running.launch.name)
    return killed


def run_oneshot(item: Launch, home: Path, report: Report) -> bool:
    """Run a one-shot service to completion; True when it exits 0."""
    running = start(item, home)
    try:
        code = running.process.wait(ONESHOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop([running])
        report.fail(f"{item.name}: one-shot still running after {ONESHOT_TIMEOUT:.0f}s{tail(running.log)}")
        return False
    if code != 0:
        report.fail(f"{item.name}: one-shot exited {code} after {running.elapsed:.1f}s{tail(running.log)}")
        return False
    report.ok(f"{item.name}: one-shot exited 0 after {running.elapsed:.1f}s")
    return True


def healthy(item: Launch) -> bool:
    """True when the launch's healthcheck command exits 0 in time."""
    assert item.healthcheck is not None
    try:
        result = subprocess.run(
            item.healthcheck, env=item.env, capture_output=True, timeout=item.health_timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def judge(running: Running, settle: float, report: Report) -> None:
    """Give a still-undecided service its verdict once there is one."""
    item, code = running.launch, running.process.poll()
    if code is not None:
        running.verdict = "failed"
        report.fail(f"{item.name}: exited {code} after {running.elapsed:.1f}s{tail(running.log)}")
    elif item.healthcheck is None:
        if running.elapsed >= settle:
            running.verdict = "ok"
            report.ok(f"{item.name}: still running after {running.elapsed:.1f}s (no healthcheck)")
    elif time.monotonic() - running.last_probe >= 1.0:
        running.last_probe = time.monotonic()
        if healthy(item):
            running.verdict = "ok"
            report.ok(f"{item.name}: healthcheck passed after {running.elapsed:.1f}s")
        elif running.elapsed >= item.health_wait:
            running.verdict = "failed"
            report.fail(
                f"{item.name}: healthcheck still failing after {running.elapsed:.1f}s{tail(running.log)}"
            )


def watch(started: list[Running], settle: float, report: Report) -> None:
    """Judge every long-running service; then each one judged ok must still be running."""
    while any(r.verdict is None for r in started):
        for running in started:
            if running.verdict is None:
                judge(running, settle, report)
        time.sleep(0.2)
    for running in started:
        code = running.process.poll()
        if running.verdict == "ok" and code is not None:
            report.fail(f"{running.launch.name}: exited {code} after passing{tail(running.log)}")


def run_launches(launches: list[Launch], home: Path, settle: float, report: Report) -> None:
    """One-shots in order, then every other service at once; stop them all at the end."""
    for item in (i for i in launches if i.oneshot):
        if not run_oneshot(item, home, report):
            rest = [i.name for i in launches if not i.oneshot]
            report.fail(f"not started after the failed one-shot: {', '.join(rest) or '(none)'}")
            return
    started = [start(item, home) for item in launches if not item.oneshot]
    try:
        watch(started, settle, report)
    finally:
        killed = stop(started)
        if killed:
            report.note(
                f"killed after {STOP_GRACE:.0f}s of SIGTERM (stopping is not checked): {', '.join(killed)}"
            )


def run_start_check(
    compose_path: Path,
    *,
    only: list[str] | None = None,
    settle: float = 5.0,
    pg_admin_url: str | None = None,
    redis_url: str | None = None,
    quiet: bool = False,
) -> Report:
    """Start the compose file's app services locally (see ``devtools.compose_start``).

    Args:
        compose_path: The compose file.
        only: Start only these services (default: every service built from a Dockerfile).
        settle: Seconds a service without a healthcheck must stay up.
        pg_admin_url: The local PostgreSQL (default $TASKGATE_TEST_PG or 127.0.0.1:5432).
        redis_url: The local Redis (default $TASKGATE_TEST_REDIS or 127.0.0.1:6379/0).
        quiet: Do not print the report's lines.

    Returns:
        The report: ``problems`` is empty when every service started.
    """
    report = Report(quiet=quiet)
    began = time.monotonic()
    if not quiet:
        print(f"check-compose --start: {compose_path}", flush=True)
    try:
        doc = load(compose_path)
    except ComposeError as exc:
        report.fail(str(exc))
        return report
    urls = {k: v for k, v in (("pg_admin_url", pg_admin_url), ("redis_url", redis_url)) if v}
    with private_stack(**urls) as stack, tempfile.TemporaryDirectory(prefix="compose-start-") as tmp:
        launches = plan(doc, compose_path.resolve(), stack, Path(tmp), report, only)
        run_launches(launches, Path(tmp), settle, report)
    report.ok(f"start check took {time.monotonic() - began:.1f}s")
    return report
