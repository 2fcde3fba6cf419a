"""``taskgate schedules list|get|create|update|pause|resume|delete|trigger|import``.

Exit codes as for ``service.cli.tasks``: 0 done, 2 refused or unreachable (and ``import``
with entries it could not translate). Schedules print as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from typing import Any

from service.cli import beat_import
from service.cli.tasks import OK, REFUSED, _consoles
from taskgate.client import Client, Schedule, TaskgateError

COMMANDS = ("schedules",)


def _json(schedule: Schedule) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, dt.timedelta):
            return value.total_seconds()
        return value.isoformat() if isinstance(value, dt.datetime) else str(value)

    return json.dumps(dataclasses.asdict(schedule), default=default)


def _spec_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    spec = parser.add_mutually_exclusive_group(required=required)
    spec.add_argument("--cron", help="five-field cron expression or @hourly/@daily/…")
    spec.add_argument("--interval", type=float, metavar="SECONDS", help="fire every SECONDS (at least 1)")
    parser.add_argument("--time-zone", help="IANA zone of the cron expression (default UTC)")
    parser.add_argument("--task", dest="task_name", help="the task each firing enqueues")
    parser.add_argument("--args", type=json.loads, help="JSON list of positional arguments")
    parser.add_argument("--kwargs", type=json.loads, help="JSON object of keyword arguments")
    parser.add_argument("--queue")
    parser.add_argument("--priority", type=int)
    parser.add_argument("--overlap-policy", choices=["SKIP", "ALLOW"])
    parser.add_argument("--catchup-window", type=float, metavar="SECONDS")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``schedules`` and its sub-commands to ``commands`` (argparse subparsers)."""
    top = commands.add_parser("schedules", help="periodic schedules (ScheduleService)")
    sub = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = sub.add_parser("list", parents=[common], help="list schedules as JSON lines")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    for name, text in (
        ("get", "print a schedule"),
        ("pause", "pause a schedule"),
        ("resume", "resume a schedule"),
        ("delete", "delete a schedule (its tasks stay)"),
        ("trigger", "fire a schedule once now; print the task id"),
    ):
        sub.add_parser(name, parents=[common], help=text).add_argument("schedule_id")
    create = sub.add_parser("create", parents=[common], help="create a schedule")
    create.add_argument("schedule_id")
    _spec_options(create, required=True)
    create.add_argument("--paused", action="store_true")
    update = sub.add_parser("update", parents=[common], help="change only the options given")
    update.add_argument("schedule_id")
    _spec_options(update, required=False)
    imported = sub.add_parser(
        "import", parents=[common], help="create or update schedules from a beat_schedule"
    )
    imported.add_argument("app", metavar="MODULE:APP", help="the Celery app whose beat_schedule to import")
    imported.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")


_FIELDS = ("cron", "interval", "time_zone", "task_name", "args", "kwargs", "queue", "priority")


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.overlap_policy:
        fields["overlap_policy"] = args.overlap_policy
    if args.catchup_window is not None:
        fields["catchup_window"] = args.catchup_window
    return fields


def run(args: argparse.Namespace) -> int:
    """Carry out one ``schedules`` action; return the exit code."""
    _, errors = _consoles()
    try:
        with Client(args.target) as client:
            return _act(client, args)
    except TaskgateError as exc:
        errors.print(f"[red]{exc.code.name}[/red]: {exc.details}")
        return REFUSED
    except ValueError as exc:
        errors.print(f"[red]error[/red]: {exc}")
        return REFUSED


def _act(client: Client, args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        page = client.list_schedules(page_size=args.page_size, page_token=args.page_token)
        for schedule in page.schedules:
            print(_json(schedule))
        if page.next_page_token:
            print(json.dumps({"next_page_token": page.next_page_token}))
    elif action == "get":
        print(_json(client.get_schedule(args.schedule_id)))
    elif action in ("pause", "resume"):
        print(_json(client.update_schedule(args.schedule_id, paused=action == "pause")))
    elif action == "delete":
        client.delete_schedule(args.schedule_id)
    elif action == "trigger":
        print(client.trigger_schedule(args.schedule_id))
    elif action == "create":
        fields = _fields(args)
        task_name = fields.pop("task_name", None)
        if not task_name:
            raise ValueError("--task is required")
        print(_json(client.create_schedule(args.schedule_id, task_name, paused=args.paused, **fields)))
    elif action == "update":
        print(_json(client.update_schedule(args.schedule_id, **_fields(args))))
    else:
        return _import(client, args.app, dry_run=args.dry_run)
    return OK


def _import(client: Client, spec: str, *, dry_run: bool) -> int:
    """Create or update one schedule per beat entry; report what cannot be translated."""
    translation = beat_import.translate(beat_import.load_app(spec))
    existing = set()
    token = ""
    while True:
        page = client.list_schedules(page_size=1000, page_token=token)
        existing |= {s.schedule_id for s in page.schedules}
        if not (token := page.next_page_token):
            break
    prefix = "would " if dry_run else ""
    for entry in translation.entries:
        fields = dict(entry.fields)
        if entry.schedule_id in existing:
            print(f"{prefix}update {entry.schedule_id} ({entry.name!r}: {entry.task_name})")
            if not dry_run:
                client.update_schedule(entry.schedule_id, task_name=entry.task_name, **fields)
        else:
            print(f"{prefix}create {entry.schedule_id} ({entry.name!r}: {entry.task_name})")
            if not dry_run:
                client.create_schedule(entry.schedule_id, entry.task_name, **fields)
    for name, problem in translation.problems:
        print(f"not imported: {name!r}: {problem}", file=sys.stderr)
    return REFUSED if translation.problems else OK
