"""taskgate for Celery workers: the run-once guard, progress reports, and app setup.

For an existing Celery app, one call::

    from taskgate.worker import configure
    configure(app)                      # after the app's own configuration

and, in a task, ``report_progress(current, total, message)``. The names that need Celery
are imported on first use, so ``taskgate.worker.contract`` (which the gateway imports)
stays free of Celery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from taskgate.worker.contract import PROGRESS_STATE, CelerySettings, RedisKeys, common_conf

if TYPE_CHECKING:
    from taskgate.worker.cancel import TaskCancelled, cancel_requested, check_cancel
    from taskgate.worker.conf import ConfigurationError, configure
    from taskgate.worker.guard import OnceTask
    from taskgate.worker.progress import report_progress

_LAZY = {
    "TaskCancelled": "taskgate.worker.cancel",
    "cancel_requested": "taskgate.worker.cancel",
    "check_cancel": "taskgate.worker.cancel",
    "ConfigurationError": "taskgate.worker.conf",
    "configure": "taskgate.worker.conf",
    "OnceTask": "taskgate.worker.guard",
    "report_progress": "taskgate.worker.progress",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "PROGRESS_STATE",
    "CelerySettings",
    "ConfigurationError",
    "OnceTask",
    "RedisKeys",
    "TaskCancelled",
    "cancel_requested",
    "check_cancel",
    "common_conf",
    "configure",
    "report_progress",
]
