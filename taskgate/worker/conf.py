"""``configure(app)``: the one call that readies an existing Celery app for taskgate.

It leaves the app's broker and result backend URLs where they are and adds what the
gateway needs to follow the app's tasks (``taskgate.worker.contract.required_conf``), the
shared key prefix, the result backend class that also writes the durable state feed
(``FeedRedisBackend``), bounded retries of result writes through short Redis outages, and
the run-once guard (``OnceTask``) as the base class of the app's tasks; and, when the
``OTEL_*`` variables ask for it, OpenTelemetry tracing of its tasks (``tracing.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.utils.imports import symbol_by_name

from taskgate.worker.backend import FeedRedisBackend
from taskgate.worker.contract import KEY_PREFIX_SETTING, CelerySettings, check_key_prefix, required_conf
from taskgate.worker.guard import OnceTask
from taskgate.worker.tracing import install as install_tracing

log = logging.getLogger(__name__)

_REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://")
_OPTION_NAMES = ("broker_transport_options", "result_backend_transport_options")

#: Result writes (STARTED, RETRY and the final state) retry through a Redis outage: up to
#: 20 tries, backoff from 0.2 s doubling to at most 5 s with full jitter — about 40 s on
#: average, 86 s at most, before Celery gives the write up.
RESULT_RETRY_CONF: dict[str, Any] = {
    "result_backend_always_retry": True,
    "result_backend_max_retries": 20,
    "result_backend_base_sleep_between_retries_ms": 200,
    "result_backend_max_sleep_between_retries_ms": 5000,
}

#: Celery 5.7 lowers a worker's prefetch count after a lost broker connection and restores
#: it from the acking thread with a synchronous ``basic.qos``; with the threads pool that
#: thread reads the consumer's AMQP connection at the same time as the consumer, and the
#: worker stops consuming after a RabbitMQ restart (seen: 64 messages held, none run, for
#: minutes). Kept off: the full prefetch count applies again at once after a reconnect.
CONSUMER_CONF: dict[str, Any] = {"worker_enable_prefetch_count_reduction": False}


class ConfigurationError(ValueError):
    """The app cannot be configured for taskgate as it stands."""


def configure(
    app: Celery[Any], *, key_prefix: str | None = None, guard: bool = True, feed: bool = True
) -> Celery:
    """Apply taskgate's settings to an existing Celery app; call it after the app's own config.

    Sets ``task_track_started``, ``result_extended`` and JSON results, adds ``json`` to
    ``accept_content`` (the gateway sends JSON messages), puts the key prefix into both
    transport options' ``global_keyprefix``, retries result writes through short Redis
    outages (``RESULT_RETRY_CONF``), keeps a worker consuming after a broker restart
    (``CONSUMER_CONF``), makes ``FeedRedisBackend`` the result backend class
    (same URL: it also appends every state to the state feed) and ``OnceTask`` the base
    class of the app's tasks. The broker and result backend URLs and everything else stay
    the app's.

    Args:
        app: the worker's Celery app; its tasks must not have been created yet when
            ``guard`` is on (``@app.task`` is lazy, so module-level tasks are fine).
        key_prefix: the deployment's ``TASKGATE_KEY_PREFIX``; None reads the environment
            variable, and falls back to a ``global_keyprefix`` the app already has.
        guard: install the run-once guard (skip a second delivery of the same id).
        feed: install ``FeedRedisBackend`` (the durable state feed).

    Returns:
        ``app``, for chaining.

    Raises:
        ConfigurationError: the result backend is not Redis, the key prefix disagrees
            with the app's own ``global_keyprefix``, or the app's base task class is
            already built without the guard.
    """
    conf = app.conf
    _check_backend(conf.get("result_backend"))
    prefix = _key_prefix(conf, key_prefix)
    accept = list(conf.get("accept_content") or ["json"])
    settings: dict[str, Any] = {
        **required_conf(),
        **RESULT_RETRY_CONF,
        **CONSUMER_CONF,
        "accept_content": accept if "json" in accept else [*accept, "json"],
        KEY_PREFIX_SETTING: prefix,
    }
    if prefix:
        for name in _OPTION_NAMES:
            settings[name] = {**(conf.get(name) or {}), "global_keyprefix": prefix}
    conf.update(settings)
    if feed:
        install_feed(app)
    if guard:
        install_guard(app)
    install_tracing()  # only when OTEL_* variables ask for it (taskgate/worker/tracing.py)
    log.debug("taskgate settings applied to app %s (key prefix %r)", app.main, prefix)
    return app


def install_feed(app: Celery[Any]) -> None:
    """Make ``FeedRedisBackend`` the app's result backend class (the URL stays the app's).

    Raises:
        ConfigurationError: the app already has a backend class of its own.
    """
    target: Any = app  # backend_cls is untyped in the stubs
    current = target.backend_cls
    if current is None:
        target.backend_cls = FeedRedisBackend
    elif not (isinstance(current, type) and issubclass(current, FeedRedisBackend)):
        raise ConfigurationError(
            f"the app has its own result backend class {current!r}: pass feed=False to keep it "
            "(its states then reach the gateway without the durable feed)"
        )


def install_guard(app: Celery[Any]) -> None:
    """Make ``OnceTask`` a base of the app's task class (before any task is created).

    Raises:
        ConfigurationError: the app already built its base task class without the guard.
    """
    base = app.__dict__.get("Task")  # Celery builds app.Task once, on first use
    if base is not None:
        if not issubclass(base, OnceTask):
            raise ConfigurationError(
                "the app's tasks already exist: call taskgate.worker.configure(app) before they "
                "are created, or pass task_cls='taskgate.worker:OnceTask' to Celery()"
            )
        return
    target: Any = app  # the stubs type task_cls as a string; Celery takes a class too
    current = symbol_by_name(target.task_cls or "celery.app.task:Task")
    if current is Task:
        target.task_cls = OnceTask
    elif not issubclass(current, OnceTask):
        # keep the app's own base class, with the guard in front of it
        target.task_cls = type(f"Once{current.__name__}", (OnceTask, current), {"__module__": __name__})


def _check_backend(url: Any) -> None:
    if not isinstance(url, str) or not url.startswith(_REDIS_SCHEMES):
        raise ConfigurationError(
            f"taskgate reads task states from a Redis result backend; this app's is {url!r}"
        )


def _key_prefix(conf: Any, wanted: str | None) -> str:
    """The one prefix of the app's broker and result backend keys."""
    if wanted is None:
        wanted = CelerySettings().key_prefix
    current = {(conf.get(name) or {}).get("global_keyprefix", "") for name in _OPTION_NAMES} - {""}
    if len(current) > 1:
        raise ConfigurationError(f"the broker and the result backend use different key prefixes: {current}")
    if not wanted:
        return current.pop() if current else ""
    if current and current != {wanted}:
        raise ConfigurationError(
            f"TASKGATE_KEY_PREFIX {wanted!r} differs from the app's global_keyprefix {current.pop()!r}"
        )
    return check_key_prefix(wanted)
