"""The ``tasks`` table (SQLAlchemy Core) and the column types it needs on every database."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect

from service.domain.model import TERMINAL_STATES


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timestamp that always comes back as an aware UTC datetime (SQLite too)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSONType = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
#: The terminal states as stored (sorted: generated SQL is the same text on every run).
TERMINAL = sorted(state.value for state in TERMINAL_STATES)

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("task_name", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("queue", sa.String(255), nullable=False, server_default=""),
    sa.Column("args", JSONType, nullable=False),
    sa.Column("kwargs", JSONType, nullable=False),
    sa.Column("options", JSONType, nullable=False),
    sa.Column("caller", sa.String(255), nullable=False, server_default=""),
    sa.Column("request_id", sa.String(255), nullable=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("progress", JSONType, nullable=True),
    sa.Column("result", JSONType, nullable=True),
    sa.Column("error", JSONType, nullable=True),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("create_time", UTCDateTime, nullable=False),
    sa.Column("run_time", UTCDateTime, nullable=False),
    sa.Column("update_time", UTCDateTime, nullable=False),
    sa.Column("start_time", UTCDateTime, nullable=True),
    sa.Column("end_time", UTCDateTime, nullable=True),
    # The outbox: a task with publish_after set still has to be handed to the broker,
    # no earlier than that time (a due time, or the lease of whoever is publishing it).
    sa.Column("publish_after", UTCDateTime, nullable=True),
    sa.Column("publish_time", UTCDateTime, nullable=True),
    sa.Column("publish_attempts", sa.Integer, nullable=False, server_default="0"),
    # CancelTask was called for it (service/store/cancel.py; migration 0003).
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    # The Celery node name (``celery@host``) a RUNNING task last started on (from its
    # STARTED document): the recovery pass watches that worker's heartbeat.
    sa.Column("worker", sa.String(255), nullable=True),
    # What the task belongs to (migration 0004): the schedule that fired it, the workflow
    # it is a step of; NULL when none. ``adopted``: recorded from the result backend, not
    # enqueued through the gateway (TASKGATE_ADOPT_FOREIGN).
    sa.Column("schedule_id", sa.String(255), nullable=True),
    sa.Column("workflow_id", sa.String(64), nullable=True),
    sa.Column("adopted", sa.Boolean, nullable=False, server_default=sa.false()),
    # The state feed's position (stream entry id as ms * 10**6 + seq) of the newest state
    # from the feed written to the task (migration 0009): an older one, written later by
    # another replica, does not take the task back (service/store/transition.py).
    sa.Column("feed_position", sa.BigInteger, nullable=True),
)
sa.Index(
    "ix_tasks_outbox",
    tasks.c.publish_after,
    postgresql_where=tasks.c.publish_after.isnot(None),
    sqlite_where=tasks.c.publish_after.isnot(None),
)
sa.Index("ix_tasks_caller_request_id", tasks.c.caller, tasks.c.request_id, unique=True)
# ListTasks's keyset (service/store/listing.py; migration 0003): every caller's tasks, one
# caller's, and one state's, each in (create_time, task_id) order.
sa.Index("ix_tasks_list", tasks.c.create_time, tasks.c.task_id)
sa.Index("ix_tasks_list_caller", tasks.c.caller, tasks.c.create_time, tasks.c.task_id)
sa.Index("ix_tasks_list_state", tasks.c.state, tasks.c.create_time, tasks.c.task_id)
# ListTasks with ``schedule_id = …`` / ``workflow_id = …`` (migration 0004; partial: most
# tasks belong to neither, so these cost nothing on their inserts).
sa.Index(
    "ix_tasks_list_schedule",
    tasks.c.schedule_id,
    tasks.c.create_time,
    tasks.c.task_id,
    postgresql_where=tasks.c.schedule_id.isnot(None),
    sqlite_where=tasks.c.schedule_id.isnot(None),
)
sa.Index(
    "ix_tasks_list_workflow",
    tasks.c.workflow_id,
    tasks.c.create_time,
    tasks.c.task_id,
    postgresql_where=tasks.c.workflow_id.isnot(None),
    sqlite_where=tasks.c.workflow_id.isnot(None),
)
sa.Index(
    "ix_tasks_active",
    tasks.c.update_time,
    postgresql_where=tasks.c.state.notin_(TERMINAL),
    sqlite_where=tasks.c.state.notin_(TERMINAL),
)
# Retention (service/store/operations.py; migration 0007): terminal tasks by last change.
sa.Index(
    "ix_tasks_retention",
    tasks.c.update_time,
    postgresql_where=tasks.c.state.in_(TERMINAL),
    sqlite_where=tasks.c.state.in_(TERMINAL),
)

#: Every worker whose heartbeat key a gateway of this deployment has seen, and when it last
#: saw it: only these are watched for lost work (a worker without the taskgate library never
#: heartbeats and is never declared lost).
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("hostname", sa.String(255), primary_key=True),
    sa.Column("heartbeat_time", UTCDateTime, nullable=False),
)
