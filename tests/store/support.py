"""Builders for the store tests: new tasks and the domain's view of them."""

from __future__ import annotations

import datetime as dt
import uuid

from service.domain.model import Delivery, TaskState
from service.store.rows import NewTask

T0 = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    """``T0`` plus ``seconds``."""
    return T0 + dt.timedelta(seconds=seconds)


def new_task(
    *,
    task_id: str | None = None,
    caller: str = "alice",
    request_id: str = "",
    fingerprint: str = "",
    publish_after: dt.datetime | None = None,
    state: TaskState = TaskState.QUEUED,
    args: list[object] | None = None,
) -> NewTask:
    """A new task due for publishing at ``publish_after`` (default ``T0``)."""
    delivery = Delivery(
        task_id=task_id or str(uuid.uuid4()),
        task_name="demo.add",
        args=list(args if args is not None else [1, 2]),
        kwargs={"k": "v"},
        run_time=T0,
        queue="q",
        priority=3,
        expire_time=at(3600),
        headers={"h": "x"},
    )
    return NewTask(
        delivery=delivery,
        state=state,
        caller=caller,
        request_id=request_id,
        create_time=T0,
        fingerprint=fingerprint or ("f-" + request_id if request_id else ""),
        publish_after=publish_after or T0,
        held=False,
    )
