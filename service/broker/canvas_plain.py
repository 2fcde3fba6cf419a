"""The plain workflows' messages, built by hand exactly as Celery's canvas builds them.

Running Celery's canvas (``service.broker.canvas``) costs far more per task than the
message itself. The three shapes nearly every caller sends are built here instead, field
for field what ``apply_async`` sends (protocol v2, ``celery.app.amqp.as_task_v2``; body
``(args, kwargs, {callbacks, errbacks, chain, chord})``):

- a **group** of tasks: one message per member, ``group`` = the group id and
  ``group_index`` = its place;
- a **chain** of tasks: one message, the first task's, with the later tasks as signatures
  in ``embed.chain``, last first;
- a **chord** (a chain of a group of tasks, then one or more tasks): one message per header
  task with ``group`` = a fresh id (Celery draws a new one when it freezes a chord) and the
  body's signature in ``embed.chord`` (its ``options.chain``: the tasks after it, last
  first); and the result-backend writes that make the last header task fire the body
  (``DEL celery-taskset-meta-<gid>.c``, ``SET <same>.s <size> EX chord_expires``).

Any other shape (nesting, groups of one, a chain of one) answers None: Celery's canvas
builds it. ``tests/integration/test_workflow_wire.py`` compares every shape with what
Celery's canvas sends, field by field.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery.utils.saferepr import saferepr

from service.domain.model import Delivery
from service.domain.workflow import BackendWrite, ChainStep, GroupStep, Step, TaskStep

#: Celery's ``argsrepr_maxsize`` and ``kwargsrepr_maxsize``.
REPR_MAXSIZE = 1024
_SCALARS = frozenset((int, float, bool, type(None)))


@dataclass(frozen=True, slots=True)
class Sender:
    """What a message says of the process that sends it, and where the chord keys live."""

    #: the ``origin`` header (Celery's ``anon_nodename()``)
    origin: str
    #: the ``reply_to`` option of every embedded signature (Celery's ``app.thread_oid``)
    reply_to: str
    #: ``task_repr_maxlevels``
    repr_maxlevels: int
    #: the result backend's key of a group id with a suffix (``get_key_for_group``)
    group_key: Callable[[str, str], str]
    #: seconds the chord size key lives (``chord_expires``: ``result_chord_expires``, else
    #: ``result_expires``); None: for ever
    chord_expires: int | None


Built = tuple[list[Delivery], list[BackendWrite]]


def build(root: Step, now: dt.datetime, trace: Mapping[str, str], sender: Sender) -> Built | None:
    """The entry deliveries (with their messages) and backend writes of ``root``, or None
    when ``root`` is not one of the plain shapes.

    ``trace`` (the caller's ``traceparent``/``tracestate``) goes into every message's
    headers and every embedded signature's ``headers`` option.
    """
    if isinstance(root, GroupStep):
        members = _tasks(root.steps)
        if members is None:
            return None
        builder = _Builder(now, trace, sender)
        return [builder.delivery(task, group=(root.group_id, i)) for i, task in enumerate(members)], []
    if isinstance(root, ChainStep) and len(root.steps) >= 2:
        head, rest = root.steps[0], _tasks(root.steps[1:], least=1)
        if rest is None:
            return None
        builder = _Builder(now, trace, sender)
        if isinstance(head, TaskStep):
            return [builder.delivery(head, chain=builder.chain(rest))], []
        members = _tasks(head.steps) if isinstance(head, GroupStep) else None
        if members is not None:
            return builder.chord(members, rest[0], rest[1:])
    return None


def _tasks(steps: Sequence[Step], least: int = 2) -> list[TaskStep] | None:
    """``steps`` if they are at least ``least`` tasks, else None."""
    if len(steps) < least or not all(isinstance(step, TaskStep) for step in steps):
        return None
    return list(steps)  # type: ignore[arg-type]


class _Builder:
    def __init__(self, now: dt.datetime, trace: Mapping[str, str], sender: Sender) -> None:
        self._now = now
        self._trace = dict(trace)
        self._sender = sender

    def chord(self, members: list[TaskStep], body: TaskStep, after: list[TaskStep]) -> Built:
        group_id = str(uuid.uuid4())
        extra = {"chain": self.chain(after), "root_id": None, "group_id": group_id}
        signature = self.signature(body, extra)
        deliveries = [
            self.delivery(task, group=(group_id, i), chord=signature) for i, task in enumerate(members)
        ]
        key = self._sender.group_key
        writes = [
            BackendWrite(key(group_id, ".c")),
            BackendWrite(key(group_id, ".s"), str(len(members)), self._sender.chord_expires),
        ]
        return deliveries, writes

    def chain(self, tasks: list[TaskStep]) -> list[dict[str, Any]]:
        """``tasks`` as ``embed.chain`` carries them: signatures, the last first."""
        return [self.signature(task) for task in reversed(tasks)]

    def signature(self, task: TaskStep, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``task`` as a Celery signature (``Signature`` as a dict)."""
        options: dict[str, Any] = {"task_id": task.task_id}
        if task.queue:
            options["queue"] = task.queue
        if task.priority is not None:
            options["priority"] = task.priority
        headers = self._headers(task)
        if headers:
            options["headers"] = headers
        if task.time_limit is not None:
            options["time_limit"] = task.time_limit
        if task.soft_time_limit is not None:
            options["soft_time_limit"] = task.soft_time_limit
        if task.expire_after is not None:
            options["expires"] = task.expire_after
        options["reply_to"] = self._sender.reply_to
        if extra:
            options.update(extra)
        return {
            "task": task.task_name,
            "args": list(task.args),
            "kwargs": dict(task.kwargs),
            "options": options,
            "subtask_type": None,
            "immutable": task.immutable,
        }

    def _headers(self, task: TaskStep) -> dict[str, str]:
        if not self._trace:
            return task.headers
        return {**task.headers, **self._trace}

    def delivery(
        self,
        task: TaskStep,
        *,
        group: tuple[str, int] | None = None,
        chain: list[dict[str, Any]] | None = None,
        chord: dict[str, Any] | None = None,
    ) -> Delivery:
        """The delivery of an entry task, with the message ``apply_async`` sends for it."""
        expire_time = None
        if task.expire_after is not None:
            expire_time = self._now + dt.timedelta(seconds=task.expire_after)
        maxlevels = self._sender.repr_maxlevels
        headers: dict[str, Any] = {
            "lang": "py",
            "task": task.task_name,
            "id": task.task_id,
            "shadow": None,
            "eta": None,
            "expires": expire_time.isoformat() if expire_time is not None else None,
            "group": group[0] if group else None,
            "group_index": group[1] if group else None,
            "retries": 0,
            "timelimit": [task.time_limit, task.soft_time_limit],
            "root_id": task.task_id,
            "parent_id": None,
            "argsrepr": args_repr(task.args, maxlevels),
            "kwargsrepr": "{}"
            if not task.kwargs
            else saferepr(task.kwargs, REPR_MAXSIZE, maxlevels=maxlevels),
            "origin": self._sender.origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        headers.update(self._headers(task))
        embed = {"callbacks": None, "errbacks": None, "chain": chain or None, "chord": chord}
        # the step's args and kwargs are shared, not copied: nothing changes them after this
        return Delivery(
            task_id=task.task_id,
            task_name=task.task_name,
            args=task.args,
            kwargs=task.kwargs,
            run_time=self._now,
            queue=task.queue,
            priority=task.priority,
            expire_time=expire_time,
            headers=task.headers,
            time_limit=task.time_limit,
            soft_time_limit=task.soft_time_limit,
            message={"headers": headers, "body": [task.args, task.kwargs, embed]},
            trace_headers=self._trace or None,
        )


def args_repr(args: Sequence[Any], maxlevels: int) -> str:
    """Celery's ``argsrepr`` of ``args`` (sent as a tuple): ``saferepr``, or ``repr`` where
    the two agree (numbers, booleans and None, short of the size limit), which is faster."""
    for value in args:
        if type(value) not in _SCALARS:
            return str(saferepr(tuple(args), REPR_MAXSIZE, maxlevels=maxlevels))
    text = repr(tuple(args))
    if len(text) < REPR_MAXSIZE:
        return text
    return str(saferepr(tuple(args), REPR_MAXSIZE, maxlevels=maxlevels))
