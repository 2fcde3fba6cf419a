"""The task store: the port (``base.py``), its SQL implementation and its errors."""

from service.store.base import TaskStorePort
from service.store.errors import StatementRejected
from service.store.rows import NewTask
from service.store.tasks import TaskStore

__all__ = ["NewTask", "StatementRejected", "TaskStore", "TaskStorePort"]
