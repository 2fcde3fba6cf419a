"""The demo worker app for the broker tests: ``celery -A tests.amqp_worker worker``.

The demo app (``workers``) as it is, plus ``task_queue_max_priority`` from
``TASKGATE_QUEUE_MAX_PRIORITY`` when set: on RabbitMQ the workers must declare queues with
the same ``x-max-priority`` as the gateway.
"""

from __future__ import annotations

import os

import workers.demo  # noqa: F401 - registers the demo tasks
from workers import app

if os.environ.get("TASKGATE_QUEUE_MAX_PRIORITY"):
    app.conf.task_queue_max_priority = int(os.environ["TASKGATE_QUEUE_MAX_PRIORITY"])

__all__ = ["app"]
