"""The Celery app of the taskgate workers: ``celery -A workers worker``.

Its tasks are the gateway's default catalog. The app takes every setting from the shared
contract (``common_conf``: ``task_track_started`` and ``result_extended`` so the gateway
sees STARTED and the task's name and retries) and then ``configure(app)``, as any app
would: the result backend that also writes the durable state feed, bounded retries of
result writes, and the run-once guard as its base task.
"""

from __future__ import annotations

from celery import Celery

from taskgate.worker import CelerySettings, OnceTask, common_conf, configure

settings = CelerySettings()

app = Celery("workers", include=["workers.demo"], task_cls=OnceTask)
app.conf.update(common_conf(settings), worker_hijack_root_logger=False)
configure(app, key_prefix=settings.key_prefix)

__all__ = ["app", "settings"]
