"""A workflow as Celery's canvas sends it: the exact messages, captured instead of sent.

The step tree becomes Celery's own canvas objects (``Signature``, ``chain``, ``group``; a
group followed by a step in a chain becomes a ``chord`` as Celery makes it), every task id
and group id fixed in advance. ``apply_async`` then runs Celery's canvas code for real,
with two things swapped on a private app: the message sender records each message
(headers and body: the reversed chain in ``embed.chain``, ``group``/``group_index``, the
chord body in ``embed.chord``) instead of publishing it, and the Redis result backend's
client records its writes (the chord's size key ``celery-taskset-meta-<group_id>.s``)
instead of making them. What it records is what ``chain(...).apply_async()`` would have
sent, byte for byte in meaning (``tests/integration/test_workflow_wire.py`` compares them);
the gateway stores the messages in the outbox and makes the backend writes itself
(``service/results/chords.py``) before the entry messages can be published.

Celery's canvas is synchronous Python; one capture runs at a time (a lock), on the caller's
thread (Celery keeps a result backend per thread: each is made to record on first use).
It costs several times a task's own enqueue: the plain shapes (a group of tasks, a chain
of tasks, a chord of tasks) are built by hand instead (``build``,
``service.broker.canvas_plain``), and only the others go through Celery's canvas.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from celery import Celery
from celery.app.registry import TaskRegistry
from celery.canvas import Signature, chain, group
from celery.utils.nodenames import anon_nodename

from service.broker import canvas_plain
from service.domain.model import Delivery
from service.domain.workflow import BackendWrite, ChainStep, Step, TaskStep, tasks_of
from taskgate.worker.contract import CelerySettings, common_conf


@dataclass(slots=True)
class Captured:
    """What applying a workflow's canvas sends: the entry messages and the backend writes."""

    deliveries: list[Delivery] = field(default_factory=list)
    writes: list[BackendWrite] = field(default_factory=list)


class _RecordingClient:
    """Stands in for the result backend's Redis client: records SET and DEL."""

    def __init__(self) -> None:
        self.writes: list[BackendWrite] = []

    def set(self, key: str, value: Any, ex: int | None = None, **_: Any) -> None:
        text = value.decode() if isinstance(value, bytes) else str(value)
        self.writes.append(BackendWrite(_text(key), text, int(ex) if ex else None))

    def delete(self, *keys: Any) -> None:
        self.writes.extend(BackendWrite(_text(key)) for key in keys)


def _text(key: Any) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


class _Connection:
    @contextlib.contextmanager
    def _reraise_as_library_errors(self) -> Iterator[None]:
        yield


class _Producer:
    """The producer ``send_task`` is handed: nothing is published through it."""

    connection = _Connection()


class BuiltinTasks(TaskRegistry):
    """A task registry that keeps only Celery's own tasks (``celery.*``).

    Celery adds every shared task (``@app.task`` shares by default) to every app, so a
    process that imported a task module would send its tasks through ``Task.apply_async``
    (``ignore_result`` from the task, the task's own options, its signature checked) and the
    rest through ``send_task``. The gateway sends tasks it does not run: always as
    ``send_task`` does, whatever the process imported.
    """

    def __setitem__(self, name: str, task: Any) -> None:
        if name.startswith("celery."):
            super().__setitem__(name, task)


class CanvasCapture:
    """Builds a workflow's Celery canvas and records what applying it sends."""

    def __init__(self, settings: CelerySettings) -> None:
        app = Celery("taskgate-canvas", set_as_current=False, tasks=BuiltinTasks())  # type: ignore[arg-type]
        app.conf.update(common_conf(settings), task_publish_retry=False)
        self._app = app
        self._lock = threading.Lock()
        self._messages: list[tuple[str, dict[str, Any], Any]] = []
        self._client = _RecordingClient()
        app.amqp.__dict__["send_task_message"] = self._record_message
        backend: Any = app.backend  # a RedisBackend (celery-types knows only the base)
        self._sender = canvas_plain.Sender(
            origin=anon_nodename(),
            reply_to=app.thread_oid,
            repr_maxlevels=app.conf.task_repr_maxlevels,
            group_key=lambda group_id, suffix: _text(backend.get_key_for_group(group_id, suffix)),
            chord_expires=int(backend.chord_expires) if backend.chord_expires else None,
        )

    def _recording_backend(self) -> None:
        """Make this thread's result backend record (Celery keeps one backend per thread)."""
        backend = self._app.backend
        if backend.__dict__.get("client") is self._client:
            return
        backend.__dict__["client"] = self._client  # a cached_property on RedisBackend
        # send_task and the group results would subscribe to each result's channel
        backend.__dict__["on_task_call"] = _no_subscription
        backend.__dict__["add_pending_result"] = _not_pending
        backend.__dict__["remove_pending_result"] = _not_pending  # AsyncResult.__del__

    @property
    def app(self) -> Celery:
        """The private app the canvas is built on (for tests)."""
        return self._app

    def _record_message(self, producer: Any, name: str, message: Any, **options: Any) -> None:
        headers = dict(message.headers)
        headers.update(options.get("headers") or {})
        self._messages.append((name, headers, message.body))

    def signature(self, step: Step, trace: Mapping[str, str] | None = None) -> Signature:
        """The Celery canvas of ``step``, with every id fixed (and ``trace`` in every
        task's headers)."""
        if isinstance(step, TaskStep):
            return Signature(
                step.task_name,
                args=tuple(step.args),
                kwargs=step.kwargs,
                options=_task_options(step, trace),
                immutable=step.immutable,
                app=self._app,
            )
        children = [self.signature(child, trace) for child in step.steps]
        if isinstance(step, ChainStep):
            return chain(*children, app=self._app)
        return group(children, app=self._app).set(task_id=step.group_id)

    def build(self, root: Step, now: dt.datetime, trace: Mapping[str, str] | None = None) -> Captured | None:
        """What ``capture`` records, built by hand for the plain shapes (a group, a chain
        or a chord of tasks; ``service.broker.canvas_plain``); None for any other."""
        built = canvas_plain.build(root, now, trace or {}, self._sender)
        return None if built is None else Captured(*built)

    def capture(self, root: Step, now: dt.datetime, trace: Mapping[str, str] | None = None) -> Captured:
        """Apply ``root``'s canvas on the recording app: its entry messages, as deliveries
        (in the order Celery sends them), and its result-backend writes. ``trace`` (the
        caller's ``traceparent``/``tracestate``) goes into every task's ``headers``."""
        by_id = {task.task_id: task for task in tasks_of(root)}
        with self._lock:
            self._recording_backend()
            self._messages.clear()
            self._client.writes.clear()
            self.signature(root, trace).apply_async(producer=_Producer())  # type: ignore[arg-type]
            messages, writes = list(self._messages), list(self._client.writes)
        captured = Captured(writes=writes)
        for name, headers, body in messages:
            step = by_id[headers["id"]]
            plain = orjson.loads(orjson.dumps({"headers": headers, "body": body}, default=str))
            captured.deliveries.append(_delivery(step, name, plain, now, trace))
        return captured


def _no_subscription(*_: Any, **__: Any) -> None:
    return None


def _not_pending(result: Any, *_: Any, **__: Any) -> Any:
    return result


def _task_options(step: TaskStep, trace: Mapping[str, str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {"task_id": step.task_id}
    if step.queue:
        options["queue"] = step.queue
    if step.priority is not None:
        options["priority"] = step.priority
    if step.headers or trace:
        options["headers"] = {**step.headers, **(trace or {})}
    if step.time_limit is not None:
        options["time_limit"] = step.time_limit
    if step.soft_time_limit is not None:
        options["soft_time_limit"] = step.soft_time_limit
    if step.expire_after is not None:
        options["expires"] = step.expire_after
    return options


def _delivery(
    step: TaskStep, name: str, message: dict[str, Any], now: dt.datetime, trace: Mapping[str, str] | None
) -> Delivery:
    args, kwargs, _ = message["body"]
    expires = message["headers"].get("expires")
    return Delivery(
        task_id=step.task_id,
        task_name=name,
        args=list(args),
        kwargs=dict(kwargs),
        run_time=now,
        queue=step.queue,
        priority=step.priority,
        expire_time=dt.datetime.fromisoformat(expires) if expires else None,
        headers=dict(step.headers),
        time_limit=step.time_limit,
        soft_time_limit=step.soft_time_limit,
        message=message,
        trace_headers=dict(trace) if trace else None,
    )
