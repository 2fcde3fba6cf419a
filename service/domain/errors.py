"""The error tree of the gateway (no gRPC here: ``service/api/status.py`` maps it to statuses).

::

    TaskgateError
    ├── InvalidRequest           INVALID_ARGUMENT  the request is malformed; fix it, do not retry
    │   ├── UnknownTask          INVALID_ARGUMENT  task_name is not in the catalog
    │   └── ArgumentsDoNotBind   INVALID_ARGUMENT  args/kwargs do not fit the task's signature
    ├── TaskNotFound             NOT_FOUND         no task with that id was enqueued here
    ├── RequestIdConflict        ALREADY_EXISTS    request_id reused with a different request
    ├── Unauthenticated          UNAUTHENTICATED   no or wrong credentials (one fixed message)
    ├── PermissionDenied         PERMISSION_DENIED the caller may not enqueue this task
    ├── LimitExceeded            RESOURCE_EXHAUSTED a limit was reached; the message names it
    │   └── RateLimited          RESOURCE_EXHAUSTED over the caller's rate; RetryInfo says when
    └── Unavailable              UNAVAILABLE       a dependency is down; retry with backoff
        ├── DatabaseUnavailable
        ├── BrokerUnavailable
        ├── ResultBackendUnavailable
        └── ShuttingDown

The codes on the right are what callers see (``service/api/status.py``). Anything else is a
bug: the caller gets INTERNAL with a fixed message and the log gets the traceback.
"""

from __future__ import annotations


class TaskgateError(Exception):
    """Base of every error the gateway raises on purpose."""


class InvalidRequest(TaskgateError):
    """The request is malformed; the message says which field and why."""


class UnknownTask(InvalidRequest):
    """The task name is not in the gateway's catalog."""


class ArgumentsDoNotBind(InvalidRequest):
    """The arguments do not fit the task's signature."""


class InvalidTasks(InvalidRequest):
    """Tasks of a batch are invalid: one ``(field, description)`` per task, by index."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        field, description = violations[0]
        more = len(violations) - 1
        suffix = f" (and {more} more invalid task{'s' if more > 1 else ''}; see the BadRequest details)"
        super().__init__(f"{field}: {description}" + (suffix if more else ""))
        self.violations = violations


class TaskNotFound(TaskgateError):
    """No task with this id was enqueued through the gateway."""


class RequestIdConflict(TaskgateError):
    """The request_id was used before with a different request."""


class Unauthenticated(TaskgateError):
    """The call carries no credentials, or wrong ones."""


class PermissionDenied(TaskgateError):
    """The caller is known but may not do this."""


class LimitExceeded(TaskgateError):
    """A server limit was reached (streams, stream lifetime); the message names it."""


class RateLimited(LimitExceeded):
    """The caller enqueues faster than its rate.

    Attributes:
        retry_after: Seconds until the next enqueue would be accepted.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(TaskgateError):
    """A dependency is unreachable; the caller may retry."""


class DatabaseUnavailable(Unavailable):
    """PostgreSQL (or the configured database) cannot be reached."""


class BrokerUnavailable(Unavailable):
    """The Celery broker cannot be reached."""


class ResultBackendUnavailable(Unavailable):
    """The result backend (Redis: states, progress, the shared subscription) cannot be reached."""


class ShuttingDown(Unavailable):
    """The server is stopping; call again (another replica, or this one once restarted)."""
