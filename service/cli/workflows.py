"""``taskgate workflow ID``: a workflow's steps, live, until it ends.

Prints one line per step each time the workflow changes (StreamWorkflow): its task id, task
name, state, and its result or error; then the workflow's state. ``--cancel`` cancels it
first (CancelWorkflow). Exit codes as for ``service.cli.tasks``: 0 SUCCEEDED, 1 FAILED or
CANCELLED, 2 refused or unreachable.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli.tasks import OK, REFUSED, TASK_FAILED, _consoles
from taskgate.client import Client, Task, TaskgateError
from taskgate.workflow import Workflow

COMMANDS = ("workflow",)

_COLOURS = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "cyan"}


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the workflow sub-command to ``commands`` (argparse subparsers)."""
    workflow = commands.add_parser(
        "workflow", parents=[common], help="show a workflow's steps live until it ends"
    )
    workflow.add_argument("workflow_id")
    workflow.add_argument("--cancel", action="store_true", help="cancel every unfinished step first")
    workflow.add_argument("--terminate", action="store_true", help="with --cancel: signal running steps")


def _outcome(task: Task) -> str:
    if task.error is not None:
        return f"{task.error.type}: {task.error.message}"
    if task.state == "SUCCEEDED":
        return json.dumps(task.result, default=str)
    return ""


def _show(workflow: Workflow) -> list[str]:
    lines = []
    for index, task in enumerate(workflow.tasks):
        colour = _COLOURS.get(task.state.value, "white")
        lines.append(
            f"  {index:>3} {task.task_id} {task.task_name:<24} [{colour}]{task.state.value:<9}[/{colour}] "
            f"{_outcome(task)}"
        )
    colour = _COLOURS.get(workflow.state.value, "white")
    lines.append(f"workflow {workflow.workflow_id}: [{colour}]{workflow.state.value}[/{colour}]")
    return lines


def run(args: argparse.Namespace) -> int:
    """Follow one workflow; return the exit code."""
    out, errors = _consoles()
    try:
        with Client(args.target) as client:
            if args.cancel:
                client.cancel_workflow(args.workflow_id, terminate=args.terminate)
            last = None
            for workflow in client.watch_workflow(args.workflow_id):
                for line in _show(workflow):
                    out.print(line)
                last = workflow
    except TaskgateError as exc:
        errors.print(f"[red]{exc.code.name}[/red]: {exc.details}")
        return REFUSED
    return OK if last is not None and last.state == "SUCCEEDED" else TASK_FAILED
