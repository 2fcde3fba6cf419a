"""``taskgate queues | workers``: what ``celery inspect`` answers, as tables (OperationsService).

Both need a caller with ``read_all``. Exit codes as for ``service.cli.tasks``: 0 done,
2 refused (PERMISSION_DENIED) or unreachable (UNAVAILABLE).
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from service.cli.tasks import OK, REFUSED, _consoles
from taskgate.client import Client, QueueInfo, TaskgateError, WorkerInfo

COMMANDS = ("queues", "workers")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the queues and workers sub-commands to ``commands`` (argparse subparsers)."""
    commands.add_parser(
        "queues", parents=[common], help="per queue: broker messages and queued/scheduled/running tasks"
    )
    commands.add_parser("workers", parents=[common], help="the workers answering now and what they run")


def queues_table(queues: list[QueueInfo]) -> Table:
    """One row per queue."""
    table = Table(title="queues")
    table.add_column("queue")
    for name in ("broker messages", "queued", "scheduled", "running"):
        table.add_column(name, justify="right")
    for q in queues:
        table.add_row(q.name, str(q.broker_messages), str(q.queued), str(q.scheduled), str(q.running))
    return table


def workers_table(workers: list[WorkerInfo]) -> Table:
    """One row per worker; its active task ids one per line."""
    table = Table(title="workers")
    table.add_column("worker")
    table.add_column("queues")
    table.add_column("concurrency", justify="right")
    table.add_column("processed", justify="right")
    table.add_column("active tasks")
    table.add_column("last seen")
    for w in workers:
        seen = "" if w.last_seen_time is None else w.last_seen_time.isoformat(timespec="seconds")
        table.add_row(
            w.hostname,
            ", ".join(w.queues),
            str(w.concurrency),
            str(w.processed),
            "\n".join(w.active_task_ids) or "-",
            seen,
        )
    return table


def run(args: argparse.Namespace) -> int:
    """Print the queues or the workers as a table; return the exit code."""
    console, errors = _consoles()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # piped: keep ids and hostnames on one line
    try:
        with Client(args.target) as client:
            if args.command == "queues":
                console.print(queues_table(client.list_queues()))
            else:
                workers = client.list_workers()
                console.print(workers_table(workers))
                if not workers:
                    errors.print("no worker answered")
    except TaskgateError as exc:
        errors.print(f"[red]{exc.code.name}[/red]: {exc.details}")
        return REFUSED
    return OK
