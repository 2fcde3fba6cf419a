"""The Celery app of the taskgate workers: ``celery -A workers worker``.

Its tasks are the gateway's default catalog. Workers run with ``task_track_started``
and ``result_extended`` so the gateway sees STARTED and the task's name and retries.
"""

from __future__ import annotations

from celery import Celery

from taskgate.worker.contract import CelerySettings, common_conf

settings = CelerySettings()

app = Celery("workers", include=["workers.demo"], task_cls="taskgate.worker.guard:OnceTask")
app.conf.update(
    common_conf(settings),
    result_backend=settings.result_backend,
    result_expires=settings.result_expires,
    result_extended=True,
    task_track_started=True,
    worker_hijack_root_logger=False,
    taskgate_key_prefix=settings.key_prefix,
)

__all__ = ["app", "settings"]
