"""``taskgate cancel | list | wait``: control commands for people at a terminal.

Exit codes as for ``service.cli.tasks``: 0 done (``wait``: SUCCEEDED), 1 ``wait`` saw
FAILED or CANCELLED, 2 refused or unreachable, 3 ``wait`` ran out of time with the task
unfinished. ``cancel`` and ``wait`` print the task as JSON; ``list`` prints one JSON object
per line (a ``{"next_page_token": …}`` line last when more pages follow).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli.tasks import OK, REFUSED, TASK_FAILED, TIMED_OUT, _as_json, _consoles
from taskgate.client import Client, Task, TaskgateError

COMMANDS = ("cancel", "list", "wait")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the cancel, list and wait sub-commands to ``commands`` (argparse subparsers)."""
    cancel = commands.add_parser(
        "cancel", parents=[common], help="cancel a task (idempotent); print it as JSON"
    )
    cancel.add_argument("task_id")
    cancel.add_argument("--terminate", action="store_true", help="signal the worker process running it")
    cancel.add_argument("--reason", default="", help="why (written to the audit log)")
    listing = commands.add_parser("list", parents=[common], help="list tasks, newest first, as JSON lines")
    listing.add_argument(
        "--filter", default="", help="AIP-160 filter, e.g. 'state = FAILED AND task_name = \"demo.*\"'"
    )
    listing.add_argument("--order-by", default="", help="'create_time desc' (default) or 'create_time'")
    listing.add_argument("--page-size", type=int, default=0, help="tasks per page (default 50, at most 1000)")
    listing.add_argument("--page-token", default="", help="next_page_token of the previous call")
    wait = commands.add_parser("wait", parents=[common], help="wait for a task to end (one WaitTask call)")
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds to wait (default 60)")


def _line(task: Task) -> str:
    return json.dumps(json.loads(_as_json(task)), separators=(",", ":"))


def run(args: argparse.Namespace) -> int:
    """Carry out one of the control commands; return the exit code."""
    _, errors = _consoles()
    try:
        with Client(args.target) as client:
            if args.command == "cancel":
                print(_as_json(client.cancel(args.task_id, terminate=args.terminate, reason=args.reason)))
                return OK
            if args.command == "list":
                page = client.list_tasks(
                    args.filter, order_by=args.order_by, page_size=args.page_size, page_token=args.page_token
                )
                for task in page.tasks:
                    print(_line(task))
                if page.next_page_token:
                    print(json.dumps({"next_page_token": page.next_page_token}))
                return OK
            task = client.wait_task(args.task_id, args.timeout)
            print(_as_json(task))
            if not task.state.terminal:
                return TIMED_OUT
            return OK if task.state == "SUCCEEDED" else TASK_FAILED
    except TaskgateError as exc:
        errors.print(f"[red]{exc.code.name}[/red]: {exc.details}")
        return REFUSED
