"""The task-queue port of a Clean-Architecture service, with a Celery and a taskgate adapter.

The application layer depends on ``TaskQueuePort`` only; the composition root picks the
adapter. Moving from Celery to taskgate is changing that one construction::

    queue: TaskQueuePort = CeleryTaskQueue(celery_app)        # before
    queue: TaskQueuePort = TaskgateTaskQueue(Client(target))  # after

Both adapters block. Task arguments must be JSON data for either (Celery's default
serializer is JSON too), and ``eta`` must be timezone-aware.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from taskgate.client import Client

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CeleryTaskQueue", "TaskQueuePort", "TaskgateTaskQueue"]


@runtime_checkable
class TaskQueuePort(Protocol):
    """Sends background tasks by name; returns their ids."""

    def enqueue(
        self,
        task_name: str,
        /,
        *args: Any,
        countdown: float | None = None,
        queue: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Run ``task_name(*args, **kwargs)`` soon (after ``countdown`` seconds); return the task id."""
        ...

    def enqueue_at(self, task_name: str, eta: dt.datetime, /, *args: Any, **kwargs: Any) -> str:
        """Run ``task_name(*args, **kwargs)`` at ``eta``; return the task id."""
        ...


class CeleryTaskQueue:
    """TaskQueuePort over ``Celery.send_task``: the broker directly, no gateway."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def enqueue(
        self,
        task_name: str,
        /,
        *args: Any,
        countdown: float | None = None,
        queue: str | None = None,
        **kwargs: Any,
    ) -> str:
        options: dict[str, Any] = {}
        if queue:
            options["queue"] = queue
        result = self._app.send_task(task_name, args=args, kwargs=kwargs, countdown=countdown, **options)
        return str(result.id)

    def enqueue_at(self, task_name: str, eta: dt.datetime, /, *args: Any, **kwargs: Any) -> str:
        return str(self._app.send_task(task_name, args=args, kwargs=kwargs, eta=eta).id)


def _options(method: Callable[..., object]) -> frozenset[str]:
    parameters = inspect.signature(method).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


#: The Client methods' own keyword options: a task keyword argument with one of these names
#: would be taken as the option, so the adapter refuses it instead.
_ENQUEUE_OPTIONS = _options(Client.enqueue)
_ENQUEUE_AT_OPTIONS = _options(Client.enqueue_at)


def _task_kwargs(kwargs: Mapping[str, Any], options: frozenset[str]) -> Mapping[str, Any]:
    clashes = sorted(options.intersection(kwargs))
    if clashes:
        raise TypeError(
            f"task keyword arguments {clashes} have the names of taskgate Client options; "
            "rename them in the task"
        )
    return kwargs


class TaskgateTaskQueue:
    """TaskQueuePort over taskgate's blocking ``Client``: durable, recorded, observable tasks."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def enqueue(
        self,
        task_name: str,
        /,
        *args: Any,
        countdown: float | None = None,
        queue: str | None = None,
        **kwargs: Any,
    ) -> str:
        return self._client.enqueue(
            task_name, *args, countdown=countdown, queue=queue or "", **_task_kwargs(kwargs, _ENQUEUE_OPTIONS)
        )

    def enqueue_at(self, task_name: str, eta: dt.datetime, /, *args: Any, **kwargs: Any) -> str:
        return self._client.enqueue_at(task_name, eta, *args, **_task_kwargs(kwargs, _ENQUEUE_AT_OPTIONS))
