"""The tasks table, with its outbox columns.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.store.tables import JSONType, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TERMINAL = "('SUCCEEDED', 'FAILED', 'CANCELLED')"


def upgrade() -> None:
    op.create_table(
        "tasks",
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
        sa.Column("publish_after", UTCDateTime, nullable=True),
        sa.Column("publish_time", UTCDateTime, nullable=True),
        sa.Column("publish_attempts", sa.Integer, nullable=False, server_default="0"),
    )
    outbox = sa.text("publish_after IS NOT NULL")
    op.create_index(
        "ix_tasks_outbox", "tasks", ["publish_after"], postgresql_where=outbox, sqlite_where=outbox
    )
    op.create_index("ix_tasks_caller_request_id", "tasks", ["caller", "request_id"], unique=True)
    active = sa.text(f"state NOT IN {_TERMINAL}")
    op.create_index("ix_tasks_active", "tasks", ["update_time"], postgresql_where=active, sqlite_where=active)


def downgrade() -> None:
    op.drop_table("tasks")
