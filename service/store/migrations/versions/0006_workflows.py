"""Workflows (WorkflowService): the workflows table (the steps are tasks rows with
``workflow_id`` set, migration 0004).

One row per workflow: who enqueued it, its request_id (unique per caller) and digest, the
step tree with every task id (JSON), and its state, terminal once the workflow loop finds
that no step can run any more; the partial index ``ix_workflows_active`` is that loop's.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_JSON = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
_ACTIVE = "state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')"


def upgrade() -> None:
    op.create_table(
        "workflows",
        sa.Column("workflow_id", sa.String(64), primary_key=True),
        sa.Column("caller", sa.String(255), nullable=False, server_default=""),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("tree", _JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_workflows_caller_request_id", "workflows", ["caller", "request_id"], unique=True)
    op.create_index(
        "ix_workflows_active",
        "workflows",
        ["create_time"],
        postgresql_where=sa.text(_ACTIVE),
        sqlite_where=sa.text(_ACTIVE),
    )


def downgrade() -> None:
    op.drop_index("ix_workflows_active", table_name="workflows")
    op.drop_index("ix_workflows_caller_request_id", table_name="workflows")
    op.drop_table("workflows")
