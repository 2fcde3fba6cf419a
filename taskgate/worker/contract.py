"""What the gateway and the workers must agree on: Redis names, the progress state, settings.

The one module of the worker side the gateway imports. It holds every Redis key and
channel name both sides use, the custom state ``report_progress`` writes, and the Celery
settings every process of a deployment shares. The broker's transport options must be
identical in every process that talks to the broker (a consumer restores unacknowledged
messages with its own ``visibility_timeout``), so both sides build them here from the same
environment variables. No Celery import: the gateway reads this module on its hot path.

Names on Redis, for a deployment with ``TASKGATE_KEY_PREFIX=<p>``::

    <p>celery-task-meta-<task_id>        result document (SETEX) and its channel (PUBLISH)
    <p>taskgate-run-<task_id>-<retries>  run-once claim of one delivery (taskgate.worker.guard)
    <p>taskgate-cancel-<task_id>         cancellation mark (CancelTask; taskgate.worker.cancel)
    <p>_kombu.binding.<queue>            kombu's binding set of a queue (and .binding_permanent.)
    <p><queue>                           the queue's list (kombu; priorities add a suffix)

Celery's result backend puts ``_`` after a ``global_keyprefix`` that does not already end
in one of ``: _ - .``; the broker (kombu) does not. ``RedisKeys`` follows both rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The custom Celery state ``report_progress`` writes.
PROGRESS_STATE = "PROGRESS"

#: Celery's ``BaseKeyValueStoreBackend.task_keyprefix``: result documents and their channels.
TASK_META_PREFIX = "celery-task-meta-"
#: The run-once guard's claim keys (taskgate.worker.guard).
RUN_CLAIM_PREFIX = "taskgate-run-"
#: Durable cancellation marks (CancelTask; taskgate.worker.cancel).
CANCEL_MARK_PREFIX = "taskgate-cancel-"
#: Seconds a cancellation mark is kept (longer than a task waits in any queue).
CANCEL_MARK_TTL = 30 * 86400
#: kombu's Redis transport: the set of bindings of an exchange (``keyprefix_queue``).
KOMBU_BINDING_PREFIX = "_kombu.binding."
#: kombu's Redis transport: bindings kept while the queue exists (``keyprefix_binding_permanent``).
KOMBU_BINDING_PERMANENT_PREFIX = "_kombu.binding_permanent."
#: The Celery configuration key the run-once guard reads its key prefix from.
KEY_PREFIX_SETTING = "taskgate_key_prefix"

#: Characters after which Celery's result backend adds no ``_`` to a ``global_keyprefix``.
_BACKEND_SEPARATORS = ":_-."
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]*$")


def backend_key_prefix(key_prefix: str) -> str:
    """The prefix Celery's result backend puts in front of its keys for ``global_keyprefix``.

    Args:
        key_prefix: the deployment's key prefix (``TASKGATE_KEY_PREFIX``), possibly empty.

    Returns:
        ``key_prefix``, with ``_`` appended when it is not empty and does not end in one of
        ``: _ - .`` (``BaseKeyValueStoreBackend._add_global_keyprefix``).
    """
    if key_prefix and key_prefix[-1] not in _BACKEND_SEPARATORS:
        return f"{key_prefix}_"
    return key_prefix


def meta_pattern(meta_prefix: str) -> str:
    """The PSUBSCRIBE pattern of every result channel under ``meta_prefix``."""
    return f"{meta_prefix}*"


#: The Redis Stream of worker-written states (see ``RedisKeys.state_feed``).
STATE_FEED = "taskgate-states"
#: The consumer group of the gateways of one deployment on the state feed.
STATE_FEED_GROUP = "taskgate-gateways"
#: The feed keeps about this many entries (XADD ... MAXLEN ~): what a gateway down for
#: longer than that many state changes finds only through its reconcile.
STATE_FEED_MAXLEN = 1_000_000
#: The key a ``FeedRedisBackend`` adds (value ``1``) to every result document it also appends
#: to the state feed: a gateway that consumes the feed leaves such a document's pub/sub
#: copy to the feed (whichever replica reads the entry writes it, once), and takes only a
#: terminal state from such a document read from Redis. Celery ignores unknown keys.
FEED_MARK = "taskgate_feed"
#: Prefix of the per-worker heartbeat keys (see ``RedisKeys.worker_heartbeat``).
WORKER_HEARTBEAT_PREFIX = "taskgate-worker-"


@dataclass(frozen=True)
class RedisKeys:
    """Every Redis key and channel name of one deployment (one key prefix)."""

    #: The deployment's key prefix (``TASKGATE_KEY_PREFIX``), as given to kombu.
    prefix: str = ""

    @property
    def task_meta_prefix(self) -> str:
        """The key (and channel) prefix of every task's result document."""
        return f"{backend_key_prefix(self.prefix)}{TASK_META_PREFIX}"

    @property
    def task_meta_pattern(self) -> str:
        """The PSUBSCRIBE pattern that matches every task's result channel."""
        return meta_pattern(self.task_meta_prefix)

    def task_meta(self, task_id: str) -> str:
        """The key of ``task_id``'s result document, also the channel its updates go to."""
        return f"{self.task_meta_prefix}{task_id}"

    def task_id_of(self, channel: str) -> str:
        """The task id in a result key or channel name (the inverse of ``task_meta``)."""
        return channel[len(self.task_meta_prefix) :]

    def run_claim(self, task_id: str, retries: int) -> str:
        """The key that records a run of ``task_id`` at attempt ``retries``."""
        return f"{self.prefix}{RUN_CLAIM_PREFIX}{task_id}-{retries}"

    def cancel_mark(self, task_id: str) -> str:
        """The durable cancellation mark of ``task_id``: set by the gateway's CancelTask
        (value: the reason, possibly empty) and checked by workers before and while running
        the task (``taskgate.worker.cancel``)."""
        return f"{self.prefix}{CANCEL_MARK_PREFIX}{task_id}"

    @property
    def state_feed(self) -> str:
        """The Redis Stream every state a taskgate worker writes is also appended to (the
        durable feed the gateway consumes with a consumer group and acknowledges after its
        database write)."""
        return f"{self.prefix}{STATE_FEED}"

    def worker_heartbeat(self, hostname: str) -> str:
        """The key a live worker (Celery node name ``hostname``) keeps refreshing; gone = the
        worker stopped heartbeating."""
        return f"{self.prefix}{WORKER_HEARTBEAT_PREFIX}{hostname}"

    def queue_binding(self, queue: str) -> str:
        """kombu's binding set of the exchange named like ``queue`` (the direct default)."""
        return f"{self.prefix}{KOMBU_BINDING_PREFIX}{queue}"

    def queue_binding_permanent(self, queue: str) -> str:
        """kombu's permanent binding set of the exchange named like ``queue``."""
        return f"{self.prefix}{KOMBU_BINDING_PERMANENT_PREFIX}{queue}"


class CelerySettings(BaseSettings):
    """Where the broker and the result backend are, read from the environment."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CELERY_BROKER_URL", "broker_url"),
    )
    result_backend: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CELERY_RESULT_BACKEND", "result_backend"),
    )
    #: Prepended to every Redis key and channel of the broker and the result backend,
    #: so several deployments (or test runs) can share one Redis.
    key_prefix: str = Field("", validation_alias=AliasChoices("TASKGATE_KEY_PREFIX", "key_prefix"))
    #: Seconds a taken-but-unacknowledged message stays hidden before the broker restores it.
    visibility_timeout: int = Field(
        3600, validation_alias=AliasChoices("CELERY_VISIBILITY_TIMEOUT", "visibility_timeout")
    )
    #: Seconds a result stays in Redis (the gateway's database keeps it for good).
    result_expires: int = Field(
        86400, validation_alias=AliasChoices("CELERY_RESULT_EXPIRES", "result_expires")
    )
    #: Seconds between two writes of a worker's heartbeat key (it lives three intervals),
    #: default 5: a dead worker is noticed within 15 s.
    worker_heartbeat: float = Field(
        5.0, gt=0, validation_alias=AliasChoices("TASKGATE_WORKER_HEARTBEAT", "worker_heartbeat")
    )
    #: RabbitMQ brokers: the ``x-max-priority`` every queue is declared with, by the gateway
    #: and (``task_queue_max_priority`` in ``common_conf``) the workers alike — RabbitMQ
    #: refuses a queue declared twice with other arguments. 0 (default): no priorities.
    queue_max_priority: int = Field(
        0, ge=0, le=255, validation_alias=AliasChoices("TASKGATE_QUEUE_MAX_PRIORITY", "queue_max_priority")
    )

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        return check_key_prefix(value)

    @property
    def keys(self) -> RedisKeys:
        """The deployment's Redis key and channel names."""
        return RedisKeys(self.key_prefix)

    @property
    def task_meta_prefix(self) -> str:
        """The Redis key (and channel) prefix of every task's result document."""
        return self.keys.task_meta_prefix


def check_key_prefix(value: str) -> str:
    """Return ``value`` if it is a usable key prefix.

    Raises:
        ValueError: it holds a character other than letters, digits and ``_ . : -``.
    """
    if not _PREFIX_RE.match(value):
        raise ValueError("TASKGATE_KEY_PREFIX may use only letters, digits and _ . : -")
    return value


def required_conf() -> dict[str, Any]:
    """Celery settings a worker app needs for the gateway to follow its tasks.

    STARTED is written only with ``task_track_started``; the task's name, arguments and
    retries reach the result document only with ``result_extended``; the gateway reads
    result documents as JSON.
    """
    return {"task_track_started": True, "result_extended": True, "result_serializer": "json"}


def transport_options(settings: CelerySettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The broker's and the result backend's transport options, in that order."""
    broker_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    backend_options: dict[str, Any] = {}
    if settings.key_prefix:
        broker_options["global_keyprefix"] = settings.key_prefix
        backend_options["global_keyprefix"] = settings.key_prefix
    return broker_options, backend_options


def common_conf(settings: CelerySettings) -> dict[str, Any]:
    """Celery configuration every process of a deployment must agree on.

    A send-only process (the gateway's ``send_task`` publisher) overrides
    ``result_backend`` with None; everything else applies to every side.
    """
    broker_options, backend_options = transport_options(settings)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": broker_options,
        "result_backend": settings.result_backend,
        "result_backend_transport_options": backend_options,
        "result_expires": settings.result_expires,
        "task_serializer": "json",
        "accept_content": ["json"],
        "enable_utc": True,
        "timezone": "UTC",
        "broker_connection_retry_on_startup": True,
        KEY_PREFIX_SETTING: settings.key_prefix,
        "task_queue_max_priority": settings.queue_max_priority or None,
        **required_conf(),
    }


__all__ = [
    "CANCEL_MARK_PREFIX",
    "CANCEL_MARK_TTL",
    "KEY_PREFIX_SETTING",
    "KOMBU_BINDING_PERMANENT_PREFIX",
    "KOMBU_BINDING_PREFIX",
    "PROGRESS_STATE",
    "RUN_CLAIM_PREFIX",
    "TASK_META_PREFIX",
    "CelerySettings",
    "RedisKeys",
    "backend_key_prefix",
    "check_key_prefix",
    "common_conf",
    "meta_pattern",
    "required_conf",
    "transport_options",
]
