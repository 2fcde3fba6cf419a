"""``taskgate enqueue | status | watch``: the API for people at a terminal.

Exit codes: 0 the task was accepted (or, with --wait / watch, SUCCEEDED); 1 it FAILED or
was CANCELLED; 2 the gateway refused the request or could not be reached, or the arguments
are unusable; 3 --timeout ran out; 130 interrupted (Ctrl-C).

Standard output carries only what a script reads (the task id, the status JSON, the outcome
line); notes for people go to standard error. Neither is ever wrapped to the terminal width.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from service.cli import payload
from taskgate.client import Client, DeadlineExceeded, Task, TaskgateError

DEFAULT_TARGET = "127.0.0.1:50051"
OK, TASK_FAILED, REFUSED, TIMED_OUT, INTERRUPTED = 0, 1, 2, 3, 130
COMMANDS = ("enqueue", "status", "watch")


class TimedOut(Exception):
    """The task had not ended when the wait ran out; the message names the task and its state."""


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--target`` before the sub-command (env TASKGATE_TARGET)."""
    parser.add_argument(
        "--target",
        default=os.environ.get("TASKGATE_TARGET", DEFAULT_TARGET),
        help="gateway address host:port (env TASKGATE_TARGET; default %(default)s); "
        "before or after the command",
    )


def _target_after_command() -> argparse.ArgumentParser:
    # SUPPRESS: given after the command it wins; not given, the global value stays
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=argparse.SUPPRESS, help="gateway address host:port")
    return common


def add_parsers(commands: Any) -> None:
    """Add the enqueue, status and watch sub-commands to ``commands`` (argparse subparsers)."""
    common = _target_after_command()
    _add_enqueue(commands, common)
    status = commands.add_parser("status", parents=[common], help="print a task's state as JSON")
    status.add_argument("task_id")
    watch = commands.add_parser("watch", parents=[common], help="show a task's progress live until it ends")
    watch.add_argument("task_id")
    watch.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds to watch at most")


def _add_enqueue(commands: Any, common: argparse.ArgumentParser) -> None:
    example = payload.example_time()
    zone = payload.local_zone()
    enqueue = commands.add_parser(
        "enqueue",
        parents=[common],
        help="enqueue a task",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Enqueue a task and print its id.\n\nArguments and keyword arguments always go to the "
        "task;\n--queue, --priority, --countdown, --at and --expires are the options of the call.",
        epilog="examples:\n"
        "  taskgate enqueue demo.add 2 3 --wait\n"
        '  taskgate enqueue demo.add --kwargs \'{"x": 2, "y": 3}\' --at +3600\n'
        f"  taskgate enqueue demo.add --args @args.json --at {example} --expires 3d\n"
        '  echo \'{"x": 2, "y": 3}\' | taskgate enqueue demo.add --kwargs -',
    )
    enqueue.add_argument("name", help="task name, e.g. demo.add")
    enqueue.add_argument(
        "args", nargs="*", help="positional arguments; each is JSON if it parses, else a string"
    )
    enqueue.add_argument(
        "--args", dest="args_json", metavar="JSON|@FILE|-",
        help="positional arguments as a JSON array, from a file (@args.json) or stdin (-); "
        "instead of positional arguments",
    )  # fmt: skip
    enqueue.add_argument(
        "--kwargs", metavar="JSON|@FILE|-",
        help="keyword arguments for the task as a JSON object, from a file (@kwargs.json) or stdin (-); "
        "every key goes to the task, even 'queue' or 'countdown'",
    )  # fmt: skip
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument(
        "--at", metavar="TIME",
        help=f"run time: +SECONDS from now (+30, +90s, +5m, +2h, +1d) or an RFC 3339 time ({example}); "
        f"a time without a zone is read as this machine's local time ({zone}); at most 365 days ahead",
    )  # fmt: skip
    when.add_argument(
        "--countdown", type=float, metavar="SECONDS", help="start no earlier than SECONDS from now"
    )
    enqueue.add_argument(
        "--expires", metavar="SECONDS|TIME",
        help="discard the task (it ends CANCELLED) if it has not started by then: seconds from now "
        "(300, 5m, 2h) or a time as for --at",
    )  # fmt: skip
    enqueue.add_argument("--queue", help="Celery queue (default: the task's route)")
    enqueue.add_argument(
        "--priority", type=int, choices=range(10), metavar="0-9", help="Celery priority, 0 (default) to 9"
    )
    enqueue.add_argument("--request-id", help="idempotency key: the same key returns the first task's id")
    enqueue.add_argument("--wait", action="store_true", help="watch the task until it ends")
    enqueue.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="seconds to wait at most (with --wait)"
    )


def _consoles() -> tuple[Console, Console]:
    """Standard output and error; soft_wrap: never wrapped at the (80-column when piped) width."""
    return Console(soft_wrap=True, highlight=False), Console(stderr=True, soft_wrap=True, highlight=False)


def _as_json(task: Task) -> str:
    def default(value: Any) -> Any:
        return value.isoformat() if isinstance(value, dt.datetime) else str(value)

    return json.dumps(dataclasses.asdict(task), default=default, indent=2)


def _outcome(task: Task, console: Console) -> int:
    if task.state == "SUCCEEDED":
        console.print(f"[green]SUCCEEDED[/green] result: {escape(json.dumps(task.result))}")
        return OK
    detail = f"{task.error.type}: {task.error.message}" if task.error else ""
    console.print(f"[red]{task.state}[/red] {escape(detail)}")
    return TASK_FAILED


def _bar(console: Console) -> Progress:
    columns = (
        TextColumn("{task.fields[state]:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console, transient=False)


def _show(bar: Progress, row: Any, task: Task) -> None:
    progress = task.progress
    if progress is not None:
        bar.update(
            row,
            completed=progress.current,
            total=progress.total or None,
            description=escape(progress.message),
        )
    bar.update(row, state=str(task.state))


def _timed_out(task_id: str, timeout: float | None, last: Task | None) -> TimedOut:
    state = f"state {last.state}" if last is not None else "no state received"
    if timeout is None:
        return TimedOut(f"the gateway ended the stream of {task_id} before the task ended ({state})")
    return TimedOut(f"timed out after {timeout:g} s waiting for {task_id} ({state})")


def _watch(client: Client, task_id: str, timeout: float | None, console: Console) -> int:
    stream: Iterator[Task] = client.progress(task_id, timeout=timeout)
    last: Task | None = None
    try:
        last = next(stream, None)  # NOT_FOUND (or a refusal) before anything is drawn
        if last is None:
            raise _timed_out(task_id, timeout, last)
        with _bar(console) as bar:
            row = bar.add_task("", total=None, state="…")
            _show(bar, row, last)
            for task in stream:
                last = task
                _show(bar, row, task)
    except DeadlineExceeded as exc:
        raise _timed_out(task_id, timeout, last) from exc
    if not last.state.terminal:
        raise _timed_out(task_id, timeout, last)
    return _outcome(last, console)


def run(args: argparse.Namespace) -> int:
    """Carry out one of the people-facing commands; return the exit code."""
    console, errors = _consoles()
    try:
        with Client(args.target) as client:
            if args.command == "status":
                print(_as_json(client.status(args.task_id)))
                return OK
            if args.command == "watch":
                return _watch(client, args.task_id, args.timeout, console)
            return _enqueue(client, args, console, errors)
    except TimedOut as exc:
        errors.print(f"[yellow]{escape(str(exc))}[/yellow]")
        return TIMED_OUT
    except TaskgateError as exc:
        errors.print(f"[red]{exc.code.name}[/red]: {escape(exc.details)}")
        return REFUSED
    except payload.BadInput as exc:
        errors.print(f"[red]bad arguments[/red]: {escape(str(exc))}")
        return REFUSED
    except KeyboardInterrupt:
        errors.print("interrupted")
        return INTERRUPTED


def _enqueue(client: Client, args: argparse.Namespace, console: Console, errors: Console) -> int:
    positional, kwargs = payload.task_arguments(args.args, args.args_json, args.kwargs)
    run_time = payload.point_in_time("--at", args.at) if args.at else None
    expires = payload.expiry(args.expires) if args.expires else None
    task_id = client.send_task(
        args.name,
        args=positional,
        kwargs=kwargs,
        queue=args.queue,
        priority=args.priority,
        countdown=args.countdown,
        run_time=run_time.moment if run_time else None,
        expire_time=expires.moment if expires else None,
        request_id=args.request_id,
    )
    print(task_id)
    sys.stdout.flush()
    _confirm(errors, task_id, run_time, expires)
    if not args.wait:
        return OK
    return _watch(client, task_id, args.timeout, console)


def _confirm(
    errors: Console, task_id: str, run_time: payload.When | None, expires: payload.When | None
) -> None:
    """A note for people on stderr: when a scheduled task runs or expires, and in which zone."""
    for label, when in (("runs at", run_time), ("expires at", expires)):
        if when is not None:
            note = f"; {when.note}" if when.note else ""
            errors.print(escape(f"task {task_id} {label} {payload.describe(when.moment)}{note}"))
