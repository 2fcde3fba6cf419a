"""``taskgate enqueue | status | watch``: the API for people at a terminal.

Exit codes: 0 the task was accepted (or, with --wait / watch, SUCCEEDED); 1 it FAILED or
was CANCELLED; 2 the gateway refused the request or could not be reached; 3 --timeout ran out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from taskgate.client import Client, DeadlineExceeded, Task, TaskgateError

DEFAULT_TARGET = "127.0.0.1:50051"
OK, TASK_FAILED, REFUSED, TIMED_OUT = 0, 1, 2, 3


def add_parsers(commands: Any) -> None:
    """Add the enqueue, status and watch sub-commands to ``commands`` (argparse subparsers)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("TASKGATE_TARGET", DEFAULT_TARGET),
        help="gateway address host:port (env TASKGATE_TARGET; default %(default)s)",
    )
    enqueue = commands.add_parser("enqueue", parents=[common], help="enqueue a task")
    enqueue.add_argument("name", help="task name, e.g. demo.add")
    enqueue.add_argument(
        "args", nargs="*", help="positional arguments; each is JSON if it parses, else a string"
    )
    enqueue.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    enqueue.add_argument("--at", help="run time: ISO 8601 (2030-01-01T09:00:00Z) or +SECONDS from now")
    enqueue.add_argument("--queue", default="", help="Celery queue (default: the task's route)")
    enqueue.add_argument("--request-id", default="", help="idempotency key")
    enqueue.add_argument("--wait", action="store_true", help="watch the task until it ends")
    enqueue.add_argument("--timeout", type=float, help="seconds to wait at most (with --wait)")
    status = commands.add_parser("status", parents=[common], help="print a task's state as JSON")
    status.add_argument("task_id")
    watch = commands.add_parser("watch", parents=[common], help="show a task's progress live until it ends")
    watch.add_argument("task_id")
    watch.add_argument("--timeout", type=float, help="seconds to watch at most")


def _argument(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _run_time(text: str) -> dt.datetime:
    if text.startswith("+"):
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=float(text[1:]))
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _as_json(task: Task) -> str:
    def default(value: Any) -> Any:
        return value.isoformat() if isinstance(value, dt.datetime) else str(value)

    return json.dumps(dataclasses.asdict(task), default=default, indent=2)


def _outcome(task: Task, console: Console) -> int:
    if task.state == "SUCCEEDED":
        console.print(f"[green]SUCCEEDED[/green] result: {json.dumps(task.result)}")
        return OK
    detail = f"{task.error.type}: {task.error.message}" if task.error else ""
    console.print(f"[red]{task.state}[/red] {detail}")
    return TASK_FAILED


def _watch(client: Client, task_id: str, timeout: float | None, console: Console) -> int:
    columns = (
        TextColumn("{task.fields[state]:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    last: Task | None = None
    with Progress(*columns, console=console, transient=False) as bar:
        row = bar.add_task("", total=None, state="…")
        for task in client.progress(task_id, timeout=timeout):
            last = task
            progress = task.progress
            if progress is not None:
                bar.update(
                    row,
                    completed=progress.current,
                    total=progress.total or None,
                    description=progress.message,
                )
            bar.update(row, state=str(task.state))
    if last is None or not last.state.terminal:
        raise DeadlineExceeded("the stream ended before the task did")
    return _outcome(last, console)


def run(args: argparse.Namespace) -> int:
    """Carry out one of the people-facing commands; return the exit code."""
    console = Console(stderr=False)
    errors = Console(stderr=True)
    try:
        with Client(args.target) as client:
            if args.command == "status":
                print(_as_json(client.status(args.task_id)))
                return OK
            if args.command == "watch":
                return _watch(client, args.task_id, args.timeout, console)
            return _enqueue(client, args, console)
    except DeadlineExceeded as exc:
        errors.print(f"[yellow]timed out[/yellow]: {exc}")
        return TIMED_OUT
    except TaskgateError as exc:
        errors.print(f"[red]{exc.code.name}[/red]: {exc.details}")
        return REFUSED
    except (ValueError, json.JSONDecodeError) as exc:
        errors.print(f"[red]bad arguments[/red]: {exc}")
        return REFUSED


def _enqueue(client: Client, args: argparse.Namespace, console: Console) -> int:
    kwargs = json.loads(args.kwargs)
    if not isinstance(kwargs, dict):
        raise ValueError("--kwargs must be a JSON object")
    positional = [_argument(text) for text in args.args]
    options: dict[str, Any] = {"queue": args.queue, "request_id": args.request_id}
    if args.at:
        task_id = client.enqueue_at(args.name, _run_time(args.at), *positional, **options, **kwargs)
    else:
        task_id = client.enqueue(args.name, *positional, **options, **kwargs)
    print(task_id)
    sys.stdout.flush()
    if not args.wait:
        return OK
    return _watch(client, task_id, args.timeout, console)
