"""Reading Celery's Redis result-backend documents (the protocol edge toward the workers).

Every state a worker writes is a ``SETEX`` of ``<prefix>celery-task-meta-<id>`` plus a
``PUBLISH`` of the same document on the channel of the same name. This module turns one
such document into a ``TaskUpdate``; it does no I/O.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson
from kombu.utils.json import loads

from service.domain.model import Progress, TaskError, TaskOrigin, TaskState, TaskUpdate
from taskgate.worker.contract import FEED_MARK, PROGRESS_STATE

log = logging.getLogger(__name__)

_KOMBU_TYPED = b'"__type__"'
#: orjson reads integers beyond 64 bits as floats: leave digit runs that long to kombu
_LONG_DIGITS = re.compile(rb"\d{19}")


def _decode(payload: bytes | str) -> Any:
    """The result document: orjson (5x faster) unless kombu's JSON left typed values in it
    (datetimes, UUIDs, decimals, bytes as ``{"__type__": …}``) or a number orjson would read
    inexactly (19 digits or more): then kombu's own decoder, exactly as Celery reads it."""
    raw = payload.encode() if isinstance(payload, str) else payload
    if _KOMBU_TYPED not in raw and not _LONG_DIGITS.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return loads(payload)


_STATES = {
    "STARTED": TaskState.RUNNING,
    PROGRESS_STATE: TaskState.RUNNING,
    "RETRY": TaskState.RETRYING,
    "SUCCESS": TaskState.SUCCEEDED,
    "FAILURE": TaskState.FAILED,
    "REVOKED": TaskState.CANCELLED,
}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _progress(meta: Any) -> Progress:
    if not isinstance(meta, Mapping):
        return Progress(details={"value": meta})
    details = meta.get("details")
    if not isinstance(details, Mapping):
        known = {"current", "total", "message"}
        details = {k: v for k, v in meta.items() if k not in known}
    return Progress(
        current=_number(meta.get("current")),
        total=_number(meta.get("total")),
        message=str(meta.get("message") or ""),
        details=dict(details),
    )


def _error(result: Any, traceback: Any) -> TaskError:
    tb = traceback if isinstance(traceback, str) else ""
    if isinstance(result, Mapping) and "exc_type" in result:
        raw = result.get("exc_message")
        if isinstance(raw, list | tuple):
            message = ", ".join(str(part) for part in raw)
        else:
            message = "" if raw is None else str(raw)
        return TaskError(type=str(result["exc_type"]), message=message, traceback=tb)
    return TaskError(type="Error", message="" if result is None else str(result), traceback=tb)


def _date(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str) and value:
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _start_time(status: Any, result: Any, observed: dt.datetime) -> dt.datetime:
    """When the run began: the worker's own clock in a taskgate worker's STARTED
    (``result.start_time``), else when the gateway saw the task running."""
    if status == "STARTED" and isinstance(result, Mapping):
        stamped = _date(result.get("start_time"))
        if stamped is not None:
            return stamped
    return observed


def parse_document(task_id: str, document: Mapping[str, Any], observed: dt.datetime) -> TaskUpdate | None:
    """The update a result document stands for, or None for states the gateway ignores.

    Args:
        task_id: the id the key or channel names (trusted over the document's own).
        document: the decoded result document.
        observed: when the gateway read it; used where the document carries no time.
    """
    status = document.get("status")
    state = _STATES.get(str(status))
    if state is None:
        if status in (None, "PENDING", "RECEIVED"):
            return None
        state = TaskState.RUNNING  # another custom state: the task is running
    result = document.get("result")
    retries = document.get("retries")
    update = TaskUpdate(
        task_id=task_id,
        state=state,
        observed_time=observed,
        retries=retries if isinstance(retries, int) else None,
        start_time=_start_time(status, result, observed) if state is TaskState.RUNNING else None,
        origin=_origin(document),
        in_feed=document.get(FEED_MARK) == 1,
    )
    if status == PROGRESS_STATE or (state is TaskState.RUNNING and status != "STARTED"):
        return replace(update, progress=_progress(result))
    if state is TaskState.SUCCEEDED:
        return replace(update, result=result, end_time=_date(document.get("date_done")))
    if state in (TaskState.FAILED, TaskState.RETRYING, TaskState.CANCELLED):
        error = _error(result, document.get("traceback"))
        return replace(update, error=error, end_time=_date(document.get("date_done")))
    if status == "STARTED":
        return replace(update, worker=_worker(result))
    return update


def _origin(document: Mapping[str, Any]) -> TaskOrigin | None:
    """The call the document describes (``result_extended``'s name, args, kwargs, queue);
    None without a name."""
    name = document.get("name")
    if not isinstance(name, str) or not name:
        return None
    args, kwargs, queue = document.get("args"), document.get("kwargs"), document.get("queue")
    return TaskOrigin(
        task_name=name,
        args=args if isinstance(args, list) else [],
        kwargs=kwargs if isinstance(kwargs, dict) else {},
        queue=queue if isinstance(queue, str) else "",
    )


def _worker(result: Any) -> str | None:
    """The Celery node name a STARTED document's result (``{"pid", "hostname"}``) names."""
    hostname = result.get("hostname") if isinstance(result, Mapping) else None
    return hostname if isinstance(hostname, str) and hostname else None


def parse_payload(task_id: str, payload: bytes | str, observed: dt.datetime) -> TaskUpdate | None:
    """Decode a raw result document (as stored or published) into an update.

    A payload that does not decode is logged and ignored: one bad writer must not stop
    the subscription that serves every stream.
    """
    try:
        document = _decode(payload)
    except Exception:  # noqa: BLE001 - any decoding failure is the same to us
        log.warning("task_id=%s: undecodable result document ignored", task_id)
        return None
    if not isinstance(document, Mapping):
        return None
    return parse_document(task_id, document, observed)
