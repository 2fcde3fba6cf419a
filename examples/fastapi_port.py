"""A Clean-Architecture service moving from Celery to taskgate by changing one line.

The application service depends on the ``TaskQueuePort`` protocol, never on Celery or gRPC;
the composition root (``main`` here, a FastAPI dependency provider in a real service) picks
the adapter. Run it against a gateway and its workers::

    TASKGATE_TARGET=127.0.0.1:50051 python -m examples.fastapi_port
"""

from __future__ import annotations

import os

from taskgate.adapter import TaskgateTaskQueue, TaskQueuePort
from taskgate.client import Client


class SignupService:
    """An application-layer use case: it only knows the port."""

    def __init__(self, queue: TaskQueuePort) -> None:
        self._queue = queue

    def sign_up(self, email: str) -> str:
        """Register ``email`` and schedule its follow-up work; return the background task's id."""
        # ... persist the user here ...
        return self._queue.enqueue("demo.add", 1, 2)  # stands in for "send the welcome email"


def main() -> None:
    target = os.environ.get("TASKGATE_TARGET", "127.0.0.1:50051")
    with Client(target) as client:
        # Before: queue: TaskQueuePort = CeleryTaskQueue(celery_app)   (taskgate.adapter)
        queue: TaskQueuePort = TaskgateTaskQueue(client)
        service = SignupService(queue)
        task_id = service.sign_up("ada@example.com")
        print(f"enqueued demo.add: {task_id}")
        task = client.wait(task_id, timeout=60)
        print(f"{task.task_name} {task.state}: result={task.result!r}")


if __name__ == "__main__":
    main()
