"""WorkflowService messages ⇄ domain workflows. No I/O here.

Each step is decoded with an Enqueue request's checks (names, sizes, depth, NUL, Celery's
reserved headers, priority, time limits); an error names the step by path
(``root.chain.steps[2].group.steps[0].task.priority: …``). The catalog, signature and
permission checks follow in the use case, by the same paths.
"""

from __future__ import annotations

import re

from service.api import control_convert, convert
from service.api.limits import InputLimits
from service.domain.errors import InvalidRequest
from service.domain.workflow import MAX_DEPTH, ChainStep, GroupStep, Step, TaskStep
from service.usecases.workflows import WorkflowView
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import workflow_service_pb2 as wpb

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,255}$")
#: Longest expire_after, seconds (a year).
MAX_EXPIRE = 366 * 86400.0


class _Budget:
    """Counts task steps while decoding, so a huge request stops early."""

    def __init__(self, max_tasks: int) -> None:
        self.left = max_tasks
        self.max_tasks = max_tasks

    def take(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise InvalidRequest(
                f"the workflow has more than {self.max_tasks} tasks; "
                f"the limit is {self.max_tasks} (TASKGATE_MAX_BATCH)"
            )


def workflow_of(request: wpb.EnqueueWorkflowRequest, limits: InputLimits, max_tasks: int) -> Step:
    """The request's step tree, checked in form; InvalidRequest names the step's path."""
    if not request.HasField("root"):
        raise InvalidRequest("root is required: a task, chain or group step")
    return step_of(request.root, "root", limits, _Budget(max_tasks), 1)


def request_id_of(request: wpb.EnqueueWorkflowRequest) -> str:
    """The request_id, checked as Enqueue's."""
    return convert._request_id(request.request_id)  # the same rule as Enqueue's


def step_of(message: wpb.Step, path: str, limits: InputLimits, budget: _Budget, depth: int) -> Step:
    """One step (and everything under it)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest(f"{path}: a step needs one of task, chain or group")
    if kind == "task":
        budget.take()
        return template_of(message.task, f"{path}.task", limits, step_path=path)
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"{path}: chains and groups nest deeper than {MAX_DEPTH} levels")
    children = message.chain.steps if kind == "chain" else message.group.steps
    if not children:
        raise InvalidRequest(f"{path}.{kind}.steps is empty: a {kind} needs at least one step")
    steps = tuple(
        step_of(child, f"{path}.{kind}.steps[{i}]", limits, budget, depth + 1)
        for i, child in enumerate(children)
    )
    return ChainStep(path, steps) if kind == "chain" else GroupStep(path, steps)


def template_of(message: pb.TaskTemplate, path: str, limits: InputLimits, *, step_path: str = "") -> TaskStep:
    """A task step (``path``: the template's, ending in ``.task``; ``step_path``: the
    step's, which the task step keeps)."""
    try:
        return _template(message, limits, step_path)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{path}.{exc}") from None


def _template(message: pb.TaskTemplate, limits: InputLimits, step_path: str) -> TaskStep:
    size = message.args.ByteSize() + message.kwargs.ByteSize()
    if size > limits.max_args_bytes:
        raise InvalidRequest(
            f"args and kwargs are {size} bytes serialized; "
            f"the limit is {limits.max_args_bytes} (TASKGATE_MAX_ARGS_BYTES)"
        )
    priority = message.priority if message.HasField("priority") else None
    if priority is not None and not 0 <= priority <= 9:
        raise InvalidRequest(f"priority must be between 0 and 9, got {priority}")
    reserved = sorted(name for name in message.headers if name.lower() in convert.RESERVED_HEADERS)
    if reserved:
        raise InvalidRequest(f"headers may not set Celery's own headers: {', '.join(reserved)}")
    if any("\x00" in text for item in message.headers.items() for text in item):
        raise InvalidRequest("headers may not contain the NUL character (U+0000)")
    hard, soft = control_convert.time_limits(message)  # type: ignore[arg-type]  # same fields
    expire = None
    if message.HasField("expire_after"):
        expire = control_convert.seconds_of("expire_after", message.expire_after, maximum=MAX_EXPIRE) or None
    return TaskStep(
        path=step_path,
        task_name=_name("task_name", message.task_name, required=True),
        args=convert.from_list_value(message.args, limits.max_args_depth),
        kwargs=convert.from_struct(message.kwargs, limits.max_args_depth),
        queue=_name("queue", message.queue, required=False),
        priority=priority,
        headers=dict(message.headers),
        time_limit=hard,
        soft_time_limit=soft,
        expire_after=expire,
        immutable=message.immutable,
    )


def _name(field: str, value: str, *, required: bool) -> str:
    if required and not value:
        raise InvalidRequest(f"{field} is required")
    if not _NAME_RE.fullmatch(value):
        raise InvalidRequest(f"{field} must be at most 255 letters, digits and _ . : -; got {value[:80]!r}")
    return value


def workflow_id_of(workflow_id: str) -> str:
    """A workflow id from a request; an empty or malformed one is InvalidRequest."""
    if not workflow_id:
        raise InvalidRequest("workflow_id is required")
    if len(workflow_id) > 64 or not _NAME_RE.fullmatch(workflow_id):
        raise InvalidRequest("workflow_id is not a workflow id (a UUID string)")
    return workflow_id


def workflow_to_proto(view: WorkflowView) -> wpb.Workflow:
    """A workflow view as the proto Workflow."""
    message = wpb.Workflow(
        workflow_id=view.workflow_id,
        state=convert.state_to_proto(view.state),
        tasks=[convert.task_to_proto(record) for record in view.tasks],
        create_time=convert.to_timestamp(view.create_time),
    )
    if view.end_time is not None:
        message.end_time.CopyFrom(convert.to_timestamp(view.end_time))
    return message
