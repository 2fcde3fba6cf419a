"""A workflow's step tree (chain, group, task), as Celery's canvas reads it. Pure: no I/O.

Every node has a path (``root.chain.steps[2].group.steps[0]``) that errors name. The rules
here are Celery's: a chain prepends each step's result to the args of the tasks the next
step starts with (unless they are immutable); a group's result is the list of its members'
results, and the step after a group in a chain waits for all of them (a chord).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from service.domain.model import TaskRecord, TaskState

#: Deepest nesting of chains and groups in a workflow (the root is depth 1).
MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class TaskStep:
    """A task of a workflow (the proto's ``TaskTemplate``) and the id it runs under."""

    path: str
    task_name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    priority: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds: Celery's hard and soft time limits (None: the worker's default)
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: seconds after it is sent that it may still start (None: never expires)
    expire_after: float | None = None
    #: does not receive the previous step's result (Celery's immutable signature)
    immutable: bool = False
    task_id: str = ""


@dataclass(frozen=True, slots=True)
class ChainStep:
    """Steps run one after the other."""

    path: str
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class GroupStep:
    """Steps run in parallel; ``group_id`` is Celery's group id of its members."""

    path: str
    steps: tuple[Step, ...]
    group_id: str = ""


Step = TaskStep | ChainStep | GroupStep


def tasks_of(step: Step) -> Iterator[TaskStep]:
    """Every task step under ``step``, depth first (the order of EnqueueWorkflow's task_ids)."""
    if isinstance(step, TaskStep):
        yield step
    else:
        for child in step.steps:
            yield from tasks_of(child)


def depth_of(step: Step) -> int:
    """How deeply chains and groups nest under ``step`` (a task is depth 0)."""
    if isinstance(step, TaskStep):
        return 0
    return 1 + max((depth_of(child) for child in step.steps), default=0)


def entries(step: Step) -> list[TaskStep]:
    """The tasks that start when ``step`` starts."""
    if isinstance(step, TaskStep):
        return [step]
    if isinstance(step, ChainStep):
        return entries(step.steps[0]) if step.steps else []
    return [task for child in step.steps for task in entries(child)]


def exits(step: Step) -> list[TaskStep]:
    """The tasks whose results are ``step``'s result (it is done when they all are)."""
    if isinstance(step, TaskStep):
        return [step]
    if isinstance(step, ChainStep):
        return exits(step.steps[-1]) if step.steps else []
    return [task for child in step.steps for task in exits(child)]


def receivers(step: Step) -> set[str]:
    """Paths of the tasks that are given a previous step's result (before immutability)."""
    found: set[str] = set()
    if isinstance(step, ChainStep):
        for later in step.steps[1:]:
            found.update(task.path for task in entries(later))
    if not isinstance(step, TaskStep):
        for child in step.steps:
            found |= receivers(child)
    return found


def predecessors(step: Step) -> dict[str, list[str]]:
    """For every task id, the task ids it waits for (empty for the entry tasks)."""
    found: dict[str, list[str]] = {task.task_id: [] for task in tasks_of(step)}
    _link(step, found)
    return found


def _link(step: Step, found: dict[str, list[str]]) -> None:
    if isinstance(step, TaskStep):
        return
    if isinstance(step, ChainStep):
        for before, after in zip(step.steps, step.steps[1:], strict=False):
            waited = [task.task_id for task in exits(before)]
            for task in entries(after):
                found[task.task_id].extend(waited)
    for child in step.steps:
        _link(child, found)


#: The states of a step that may turn out never to have run: still waiting, or FAILED by
#: Celery on behalf of an earlier step (a failed chain step marks every later one FAILED
#: with its own error; a chord whose header failed marks its body FAILED).
_MAY_BE_STOPPED = (TaskState.WAITING, TaskState.FAILED)


def blocked(step: Step, states: dict[str, TaskRecord]) -> dict[str, str]:
    """The tasks that can no longer run (or never ran), each with the task that stopped it.

    A task waiting for a FAILED or CANCELLED task (or for one that can no longer run) can
    never run: Celery sends it only when everything before it succeeded. Such a task may
    still read WAITING, or FAILED when Celery marked it so for the step that failed.
    """
    preds = predecessors(step)
    stopped: dict[str, str] = {}
    for task in tasks_of(step):  # depth first: every predecessor comes before its followers
        record = states.get(task.task_id)
        if record is None or record.state not in _MAY_BE_STOPPED:
            continue
        for pred in preds[task.task_id]:
            pred_record = states.get(pred)
            if pred in stopped:
                stopped[task.task_id] = stopped[pred]
                break
            if pred_record is not None and pred_record.state in (TaskState.FAILED, TaskState.CANCELLED):
                stopped[task.task_id] = pred
                break
    return stopped


def overall_state(records: list[TaskRecord]) -> TaskState:
    """The workflow's state from its steps': terminal once every step is."""
    states = {record.state for record in records}
    if all(state.terminal for state in states):
        if TaskState.FAILED in states:
            return TaskState.FAILED
        if TaskState.CANCELLED in states:
            return TaskState.CANCELLED
        return TaskState.SUCCEEDED
    if states <= {TaskState.QUEUED, TaskState.WAITING, TaskState.SCHEDULED}:
        return TaskState.QUEUED
    return TaskState.RUNNING


# --- JSON (the workflows table's tree) ---------------------------------------------------


#: The keys ``fingerprint`` leaves out, wherever they are: the ids assigned per request.
_IDS = ("task_id", "group_id")


def to_json(step: Step) -> dict[str, Any]:
    """The tree as JSON (with every id)."""
    return _tree(step, ids=True)


def _tree(step: Step, ids: bool) -> dict[str, Any]:
    """``to_json``; without ``ids``: what ``fingerprint`` digests. Written out field by field:
    ``dataclasses.asdict``'s deep copies cost ten times as much on a workflow of 1,000 steps
    (tests/unit/test_workflow_canvas.py checks it equals ``asdict``)."""
    if isinstance(step, TaskStep):
        body: dict[str, Any] = {
            "task_name": step.task_name,
            "args": step.args if ids else _without_ids(step.args),
            "kwargs": step.kwargs if ids else _without_ids(step.kwargs),
            "queue": step.queue,
            "priority": step.priority,
            "headers": step.headers if ids else _without_ids(step.headers),
            "time_limit": step.time_limit,
            "soft_time_limit": step.soft_time_limit,
            "expire_after": step.expire_after,
            "immutable": step.immutable,
        }
        if ids:
            body["task_id"] = step.task_id
        return {"task": body}
    children = [_tree(child, ids) for child in step.steps]
    if isinstance(step, ChainStep):
        return {"chain": children}
    return {"group": children, "group_id": step.group_id} if ids else {"group": children}


def from_json(value: dict[str, Any], path: str = "root") -> Step:
    """The tree back from ``to_json``."""
    if "task" in value:
        return TaskStep(path=path, **value["task"])
    kind = "chain" if "chain" in value else "group"
    children = tuple(from_json(child, f"{path}.{kind}.steps[{i}]") for i, child in enumerate(value[kind]))
    if kind == "chain":
        return ChainStep(path, children)
    return GroupStep(path, children, value.get("group_id", ""))


def fingerprint(step: Step) -> str:
    """A digest of the workflow as asked for (ids left out): equal requests, equal digests."""
    text = json.dumps(_tree(step, ids=False), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in _IDS}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def with_ids(step: Step) -> Step:
    """``step`` with a fresh task id on every task and group id on every group."""
    if isinstance(step, TaskStep):
        return TaskStep(  # the constructor: a third of dataclasses.replace's cost
            step.path,
            step.task_name,
            step.args,
            step.kwargs,
            step.queue,
            step.priority,
            step.headers,
            step.time_limit,
            step.soft_time_limit,
            step.expire_after,
            step.immutable,
            str(uuid.uuid4()),
        )
    children = tuple(with_ids(child) for child in step.steps)
    if isinstance(step, ChainStep):
        return ChainStep(step.path, children)
    return GroupStep(step.path, children, group_id=str(uuid.uuid4()))


@dataclass(frozen=True, slots=True)
class WorkflowRecord:
    """Everything the gateway keeps of one workflow besides its steps' tasks."""

    workflow_id: str
    caller: str
    request_id: str
    fingerprint: str
    root: Step
    state: TaskState
    create_time: dt.datetime
    end_time: dt.datetime | None = None

    @property
    def task_ids(self) -> list[str]:
        """Every task step's id, depth first."""
        return [task.task_id for task in tasks_of(self.root)]


@dataclass(frozen=True, slots=True)
class BackendWrite:
    """One write the Redis result backend would make: SET (``value`` given) or DEL."""

    key: str
    value: str | None = None
    #: seconds to live of a SET (None: none)
    expire: int | None = None
