"""The app's Celery instance: ``celery -A myapp.celery_app worker``.

Everything here is the app's own, except the last line: ``configure(app)`` adds what the
gateway needs (``task_track_started``, ``result_extended``, JSON results, the key prefix
from ``TASKGATE_KEY_PREFIX`` and the run-once guard) and leaves the rest alone.
"""

from __future__ import annotations

import os

from celery import Celery

from taskgate.worker import configure

app = Celery(
    "myapp",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
    include=["myapp.tasks"],
)
app.conf.update(
    task_acks_late=False,
    worker_prefetch_multiplier=4,
)

configure(app)  # the one taskgate line
