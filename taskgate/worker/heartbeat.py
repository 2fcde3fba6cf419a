"""The worker heartbeat: a key each live worker keeps refreshing, and the test of liveness.

A worker's main process writes ``RedisKeys.worker_heartbeat(<node name>)`` =
``{"hostname", "pid", "instance", "time"}`` every ``TASKGATE_WORKER_HEARTBEAT`` seconds
(default 5) with a time-to-live of three intervals, from a daemon thread started on
``worker_ready`` and stopped (the key deleted) on ``worker_shutdown``. The key is gone
within three intervals of the worker dying, however it died.

``instance`` is a random id drawn once per worker process tree (prefork children inherit
it), so a worker restarted under the same node name — and, in a container, often the same
pid — is told apart from the one that died. The run-once guard records it in its claims;
STARTED documents carry it too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from taskgate.worker.contract import CelerySettings, RedisKeys

log = logging.getLogger(__name__)

#: This worker's id, drawn at import in the main process (before the pool forks).
INSTANCE = uuid.uuid4().hex
#: A heartbeat key lives this many intervals.
TTL_INTERVALS = 3

_threads: dict[str, Heartbeat] = {}


def heartbeat_ttl(interval: float) -> int:
    """Seconds a heartbeat key lives: three intervals, at least 1."""
    return max(1, round(TTL_INTERVALS * interval))


def is_alive(client: Any, keys: RedisKeys, hostname: str, instance: str | None) -> bool:
    """Whether the worker ``hostname`` (of ``instance``, when given) still heartbeats."""
    raw = client.get(keys.worker_heartbeat(hostname))
    if raw is None:
        return False
    if instance is None:
        return True
    try:
        beat = json.loads(raw)
    except ValueError:
        return True
    return not isinstance(beat, dict) or beat.get("instance") in (None, instance)


class Heartbeat(threading.Thread):
    """A daemon thread that refreshes one worker's heartbeat key until stopped."""

    def __init__(self, client: Any, keys: RedisKeys, hostname: str, interval: float) -> None:
        super().__init__(name=f"taskgate-heartbeat-{hostname}", daemon=True)
        self.client = client
        self.key = keys.worker_heartbeat(hostname)
        self.hostname = hostname
        self.interval = interval
        self._stop_event = threading.Event()

    def beat(self) -> None:
        """Write the key once."""
        value = {"hostname": self.hostname, "pid": os.getpid(), "instance": INSTANCE, "time": time.time()}
        self.client.set(self.key, json.dumps(value), ex=heartbeat_ttl(self.interval))

    def run(self) -> None:
        """Beat every ``interval`` seconds; a failed beat is logged and tried again next time."""
        while not self._stop_event.is_set():
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis down: keep trying, the key expires
                log.warning("worker heartbeat %s not written: %s", self.key, exc)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        """Stop beating and delete the key (a clean shutdown is not a death)."""
        self._stop_event.set()
        self.join(self.interval + 1)
        try:
            self.client.delete(self.key)
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            log.warning("worker heartbeat %s not deleted: %s", self.key, exc)


def start(app: Celery, hostname: str) -> Heartbeat:
    """Start the heartbeat of the worker ``hostname`` of ``app``."""
    from taskgate.worker.guard import app_key_prefix

    interval = CelerySettings().worker_heartbeat
    backend: Any = app.backend
    beat = Heartbeat(backend.client, RedisKeys(app_key_prefix(app)), hostname, interval)
    beat.beat()
    beat.start()
    log.info("worker heartbeat %s every %.1fs", beat.key, interval)
    return beat


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    hostname = getattr(sender, "hostname", None)
    if app is None or not hostname or hostname in _threads:
        return
    try:
        _threads[hostname] = start(app, hostname)
    except Exception:
        log.exception("worker heartbeat of %s not started", hostname)


def _on_worker_shutdown(**_: Any) -> None:
    while _threads:
        _hostname, beat = _threads.popitem()
        beat.stop()


def install() -> None:
    """Connect the heartbeat to the worker's start and stop (idempotent)."""
    worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="taskgate-heartbeat-ready")
    worker_shutdown.connect(_on_worker_shutdown, weak=False, dispatch_uid="taskgate-heartbeat-stop")


__all__ = ["INSTANCE", "Heartbeat", "heartbeat_ttl", "install", "is_alive", "start"]
