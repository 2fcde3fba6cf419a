"""Runs each delivery of a task id at most once — and again if the run that claimed it died.

A task id can reach the workers twice: the gateway's outbox may publish it again after a
crash between publishing and marking it published, and the Redis broker redelivers an
unacknowledged message (``acks_late``) once its visibility timeout passes. Before a run a
worker claims ``(task_id, retries)`` in Redis (``RedisKeys.run_claim``)::

    {"state": "running", "owner": <node name>, "instance": <worker id>, "pid": <pid>}

A delivery that finds the claim taken is skipped when the claim is ``done`` (a duplicate
of a finished run) or when its owner still heartbeats (``taskgate.worker.heartbeat``): the
run is in progress elsewhere. When the owner no longer heartbeats, the run died with its
worker and the delivery takes the claim over (compare-and-set) and runs. A run that ends,
in any state, marks its claim ``done``. A Celery retry has a higher ``retries`` and so
claims afresh.

The decision is made in ``task_prerun``, before Celery stores STARTED; a skipped delivery
is flagged on its request, and ``FeedRedisBackend`` then stores no STARTED for it (so a
duplicate never hides a stored result). ``OnceTask.__call__`` raises ``Ignore`` for it (or
decides there, if ``task_prerun`` could not). Claims live in the result backend's Redis,
under the app's ``taskgate_key_prefix`` (or the backend's ``global_keyprefix``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Ignore
from celery.signals import task_postrun, task_prerun

from taskgate.worker import heartbeat
from taskgate.worker.cancel import cancelled_before_start, check_cancel
from taskgate.worker.contract import KEY_PREFIX_SETTING, RedisKeys
from taskgate.worker.retry import bounded

log = logging.getLogger(__name__)

#: How long a claim is kept, in seconds (longer than any redelivery window).
CLAIM_TTL = 7 * 86400
#: Request attributes: this delivery holds the claim / is a duplicate to skip.
_OWNED = "taskgate_claimed"
_SKIP = "taskgate_skip"
#: Replace a claim only if it still holds what the guard read (compare-and-set).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return false
"""


def app_key_prefix(app: Celery) -> str:
    """The key prefix an app's taskgate keys go under."""
    conf = app.conf
    prefix = conf.get(KEY_PREFIX_SETTING)
    if prefix is None:
        options = conf.get("result_backend_transport_options") or {}
        prefix = options.get("global_keyprefix", "")
    return str(prefix or "")


def is_skipped(request: Any) -> bool:
    """Whether the guard decided to skip this delivery (its request is flagged)."""
    return bool(getattr(request, _SKIP, False))


def _guarded(request: Any) -> bool:
    return bool(request.id) and not request.called_directly and not request.is_eager


def _claim_value(request: Any, state: str) -> str:
    owner = {"state": state, "owner": request.hostname or "", "instance": heartbeat.INSTANCE}
    return json.dumps({**owner, "pid": os.getpid()})


def _why_taken(client: Any, keys: RedisKeys, current: bytes) -> str | None:
    """Why a delivery must not run against the claim ``current`` (None: its run died)."""
    try:
        claim = json.loads(current)
    except ValueError:
        return "claimed by an unreadable claim"
    if not isinstance(claim, dict) or claim.get("state") == "done":
        return "this delivery already ran"
    owner = str(claim.get("owner") or "")
    if heartbeat.is_alive(client, keys, owner, claim.get("instance")):
        return f"running on {owner}"
    return None


def _decide(task: Task) -> bool:  # type: ignore[type-arg]
    """Claim the run of ``task.request``; True to run it, False to skip it."""
    request = task.request
    keys = RedisKeys(app_key_prefix(task.app))
    client: Any = getattr(task.backend, "client")  # noqa: B009 - untyped in the stubs
    key = keys.run_claim(str(request.id), int(request.retries or 0))
    mine = _claim_value(request, "running")
    for _ in range(3):
        if client.set(key, mine, nx=True, ex=CLAIM_TTL):
            return True
        current = client.get(key)
        if current is None:
            continue
        reason = _why_taken(client, keys, current)
        if reason is not None:
            log.warning("task_id=%s skipped: %s", request.id, reason)
            return False
        if client.eval(_TAKE_OVER, 1, key, current, mine, CLAIM_TTL):
            log.warning("task_id=%s runs again: its claimed run died with its worker", request.id)
            return True
    log.warning("task_id=%s skipped: another delivery claimed it first", request.id)
    return False


def decide(task: Task) -> bool:  # type: ignore[type-arg]
    """Decide once per delivery whether it runs, flagging the request; True to run it."""
    request = task.request
    if getattr(request, _OWNED, False):
        return True
    if is_skipped(request):
        return False
    runs = bounded(lambda: _decide(task), what=f"task_id={request.id} run claim")
    setattr(request, _OWNED if runs else _SKIP, True)
    return runs


def finish(task: Task, state: str | None) -> None:  # type: ignore[type-arg]
    """Mark the claim of a run that ended ``done`` (released instead if it was rejected)."""
    request = task.request
    keys = RedisKeys(app_key_prefix(task.app))
    client: Any = getattr(task.backend, "client")  # noqa: B009 - untyped in the stubs
    key = keys.run_claim(str(request.id), int(request.retries or 0))
    if state == states.REJECTED:
        bounded(lambda: client.delete(key), what=f"task_id={request.id} claim release")
    else:
        done = _claim_value(request, "done")
        bounded(lambda: client.set(key, done, ex=CLAIM_TTL), what=f"task_id={request.id} claim done")


def _on_prerun(task: Any = None, **_: Any) -> None:
    if isinstance(task, OnceTask) and _guarded(task.request):
        try:
            if cancelled_before_start(task):
                # no STARTED for it: ``OnceTask.__call__`` writes REVOKED and stops it
                setattr(task.request, _SKIP, True)
                return
            decide(task)
        except Exception:
            log.exception("task_id=%s: run claim failed before start", task.request.id)


def _on_postrun(task: Any = None, state: str | None = None, **_: Any) -> None:
    if isinstance(task, OnceTask) and getattr(task.request, _OWNED, False):
        try:
            finish(task, state)
        except Exception:
            log.exception("task_id=%s: run claim not marked done", task.request.id)


class OnceTask(Task):  # type: ignore[type-arg]
    """A Celery task base class that skips deliveries of an id that already ran or runs."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _guarded(self.request):
            # a task cancelled through the gateway while it waited (also while every worker
            # was down) never runs: REVOKED is written and TaskCancelled (an Ignore) raised
            if cancelled_before_start(self):
                check_cancel(self)
            if not decide(self):
                raise Ignore()
        return super().__call__(*args, **kwargs)


def install() -> None:
    """Connect the guard and the worker heartbeat to Celery's signals (idempotent)."""
    task_prerun.connect(_on_prerun, weak=False, dispatch_uid="taskgate-guard-prerun")
    task_postrun.connect(_on_postrun, weak=False, dispatch_uid="taskgate-guard-postrun")
    heartbeat.install()


install()

__all__ = ["CLAIM_TTL", "OnceTask", "app_key_prefix", "decide", "finish", "install", "is_skipped"]
