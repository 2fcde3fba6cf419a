"""taskgate: the Python client of the taskgate gateway, an asyncio gRPC front door to Celery.

::

    import taskgate

    async with taskgate.AsyncClient("127.0.0.1:50051") as client:
        task_id = await client.enqueue("demo.add", 2, 3)              # every kwarg goes to the task
        task_id = await client.send_task("demo.add", (2, 3), queue="celery", countdown=5)
        task = await client.wait(task_id, timeout=60)                 # TaskFailed if it failed

This module only re-exports the public names (``__all__``, pinned by a test). They are
imported on first use, so ``import taskgate.worker`` in a Celery worker does not load gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskgate._convert import Progress, Task, TaskCall, TaskErrorInfo, TaskPage, TaskState
    from taskgate._operations import QueueInfo, WorkerInfo
    from taskgate._schedules import Schedule, SchedulePage
    from taskgate.adapter import TaskgateTaskQueue
    from taskgate.client import AsyncClient, Client
    from taskgate.errors import (
        AlreadyExists,
        DeadlineExceeded,
        Internal,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        TaskFailed,
        TaskgateError,
        Unauthenticated,
        Unavailable,
    )
    from taskgate.workflow import Workflow, chain, group, sig

    __version__: str

_ERRORS = (
    "AlreadyExists",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TaskFailed",
    "TaskgateError",
    "Unauthenticated",
    "Unavailable",
)

#: Where each public name is defined.
_LAZY: dict[str, str] = {
    "AsyncClient": "taskgate.client",
    "Client": "taskgate.client",
    "Progress": "taskgate._convert",
    "Task": "taskgate._convert",
    "TaskCall": "taskgate._convert",
    "TaskErrorInfo": "taskgate._convert",
    "TaskPage": "taskgate._convert",
    "QueueInfo": "taskgate._operations",
    "WorkerInfo": "taskgate._operations",
    "Schedule": "taskgate._schedules",
    "SchedulePage": "taskgate._schedules",
    "TaskState": "taskgate._convert",
    "TaskgateTaskQueue": "taskgate.adapter",
    "Workflow": "taskgate.workflow",
    "chain": "taskgate.workflow",
    "group": "taskgate.workflow",
    "sig": "taskgate.workflow",
    **dict.fromkeys(_ERRORS, "taskgate.errors"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taskgate")
    except PackageNotFoundError:
        return "0+unknown"


# Hidden from type checkers, so that a misspelt name is still an error for them.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name == "__version__":
            value: Any = _version()
        elif name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Progress",
    "QueueInfo",
    "ResourceExhausted",
    "Schedule",
    "SchedulePage",
    "Task",
    "TaskCall",
    "TaskErrorInfo",
    "TaskFailed",
    "TaskPage",
    "TaskState",
    "TaskgateError",
    "TaskgateTaskQueue",
    "Unauthenticated",
    "Unavailable",
    "WorkerInfo",
    "Workflow",
    "__version__",
    "chain",
    "group",
    "sig",
]
