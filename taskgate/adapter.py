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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from taskgate.client import Client

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CeleryTaskQueue", "TaskQueuePort", "TaskgateTaskQueue"]


@runtime_checkable
class TaskQueuePort(Protocol):
    """Sends background tasks by name; returns their ids.

    ``countdown`` and ``queue`` are ``enqueue``'s options; every other keyword argument goes to
    the task. The adapters here also accept the task's keyword arguments as one ``kwargs=``
    mapping, whatever their names (for a task parameter named ``countdown``, ``queue`` or
    ``kwargs``); named ones are added to it, and a name given both ways is a TypeError.
    """

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


def _merged(explicit: Mapping[str, Any] | None, named: Mapping[str, Any]) -> dict[str, Any]:
    """The task's keyword arguments: the explicit ``kwargs=`` mapping and the named ones together."""
    both = sorted(set(explicit or {}).intersection(named))
    if both:
        raise TypeError(f"task keyword arguments {both} given both in kwargs= and by name")
    return {**(explicit or {}), **named}


class CeleryTaskQueue:
    """TaskQueuePort over ``Celery.send_task``: the broker directly, no gateway.

    Keyword arguments as in ``TaskgateTaskQueue`` (``kwargs=`` included).
    """

    def __init__(self, app: Celery) -> None:
        self._app = app

    def enqueue(
        self,
        task_name: str,
        /,
        *args: Any,
        countdown: float | None = None,
        queue: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **task_kwargs: Any,
    ) -> str:
        """Run ``task_name(*args, **kwargs, **task_kwargs)`` soon; return the task id."""
        options: dict[str, Any] = {}
        if queue:
            options["queue"] = queue
        result = self._app.send_task(
            task_name, args=args, kwargs=_merged(kwargs, task_kwargs), countdown=countdown, **options
        )
        return str(result.id)

    def enqueue_at(
        self,
        task_name: str,
        eta: dt.datetime,
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        **task_kwargs: Any,
    ) -> str:
        """Run ``task_name(*args, **kwargs, **task_kwargs)`` at ``eta`` (aware); return the task id."""
        return str(self._app.send_task(task_name, args=args, kwargs=_merged(kwargs, task_kwargs), eta=eta).id)


class TaskgateTaskQueue:
    """TaskQueuePort over taskgate's blocking ``Client``: durable, recorded, observable tasks.

    ``enqueue`` takes ``countdown`` and ``queue`` as options, as the port says; every other
    keyword argument goes to the task. For a task parameter named ``countdown``, ``queue``
    or ``kwargs``, pass the task's keyword arguments as one mapping instead (as Celery's
    ``apply_async(args, kwargs)`` does)::

        queue.enqueue("mail.send", kwargs={"queue": "outbox"}, queue="mail")

    ``enqueue_at`` has no options: all its keyword arguments go to the task (``kwargs=`` works
    there too).
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    def enqueue(
        self,
        task_name: str,
        /,
        *args: Any,
        countdown: float | None = None,
        queue: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **task_kwargs: Any,
    ) -> str:
        """Run ``task_name(*args, **kwargs, **task_kwargs)`` soon; return the task id.

        Args:
            task_name: the registered Celery task name.
            *args: positional task arguments.
            countdown: seconds to wait before the task may start; None means at once.
            queue: the Celery queue; None or empty means the task's default route.
            kwargs: task keyword arguments as a mapping, whatever their names.
            **task_kwargs: more task keyword arguments.

        Raises:
            TypeError: one task keyword argument given both ways.
        """
        return self._client.send_task(
            task_name, args, _merged(kwargs, task_kwargs), countdown=countdown, queue=queue or None
        )

    def enqueue_at(
        self,
        task_name: str,
        eta: dt.datetime,
        /,
        *args: Any,
        kwargs: Mapping[str, Any] | None = None,
        **task_kwargs: Any,
    ) -> str:
        """Run ``task_name(*args, **kwargs, **task_kwargs)`` at ``eta`` (aware); return the task id."""
        return self._client.send_task(task_name, args, _merged(kwargs, task_kwargs), run_time=eta)
