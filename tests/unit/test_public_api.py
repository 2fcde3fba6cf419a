"""The public surface of ``taskgate``: exactly these names, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import taskgate
from taskgate import _convert, _operations, _schedules, adapter, client, errors, workflow

EXPECTED = {
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Progress",
    "QueueInfo",
    "ResourceExhausted",
    "Schedule",
    "SchedulePage",
    "Task",
    "TaskCall",
    "TaskErrorInfo",
    "TaskFailed",
    "TaskPage",
    "TaskState",
    "TaskgateError",
    "TaskgateTaskQueue",
    "Unauthenticated",
    "Unavailable",
    "WorkerInfo",
    "Workflow",
    "__version__",
    "chain",
    "group",
    "sig",
}


def test_all_is_pinned() -> None:
    assert set(taskgate.__all__) == EXPECTED
    assert len(taskgate.__all__) == len(EXPECTED)


def test_every_name_is_the_object_of_its_private_module() -> None:
    homes = (client, errors, _convert, adapter, _schedules, _operations, workflow)
    for name in EXPECTED - {"__version__"}:
        value = getattr(taskgate, name)
        assert any(getattr(home, name, None) is value for home in homes), name
        assert name in dir(taskgate)


def test_version_is_a_string() -> None:
    assert isinstance(taskgate.__version__, str)
    assert taskgate.__version__


def test_unknown_name_is_an_attribute_error() -> None:
    assert not hasattr(taskgate, "Clinet")


def test_client_module_still_re_exports_what_callers_import_from_it() -> None:
    for name in ("AsyncClient", "Client", "Task", "TaskCall", "TaskState", "TaskFailed", "NotFound"):
        assert name in client.__all__
        assert getattr(client, name) is getattr(taskgate, name)


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)


def test_import_taskgate_loads_no_celery_sqlalchemy_or_service() -> None:
    _run(
        """
        import sys
        import taskgate
        heavy = ("celery", "kombu", "sqlalchemy", "service", "redis", "grpc")
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        for name in taskgate.__all__:
            getattr(taskgate, name)
        from taskgate import *  # noqa: F403
        loaded = [m for m in ("celery", "kombu", "sqlalchemy", "service", "redis") if m in sys.modules]
        assert not loaded, loaded
        """
    )


def test_worker_side_does_not_load_the_client() -> None:
    _run(
        """
        import sys
        import taskgate.worker.contract
        assert "grpc" not in sys.modules
        assert "taskgate.client" not in sys.modules
        """
    )
