"""Schedules (ScheduleService): the schedules table and what each firing needs.

One row per schedule; the firing loop claims due rows (``next_run_time`` passed, not
paused) with ``FOR UPDATE SKIP LOCKED`` through the partial index ``ix_schedules_due``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_JSON = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("schedule_id", sa.String(200), primary_key=True),
        sa.Column("caller", sa.String(255), nullable=False, server_default=""),
        sa.Column("spec", _JSON, nullable=False),
        sa.Column("template", _JSON, nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("overlap_policy", sa.String(16), nullable=False),
        sa.Column("catchup_window", sa.Float, nullable=False),
        sa.Column("next_run_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_task_id", sa.String(64), nullable=True),
        sa.Column("skipped_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("anchor_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_schedules_due",
        "schedules",
        ["next_run_time"],
        postgresql_where=sa.text("NOT paused AND next_run_time IS NOT NULL"),
        sqlite_where=sa.text("NOT paused AND next_run_time IS NOT NULL"),
    )
    op.create_index("ix_schedules_caller", "schedules", ["caller", "schedule_id"])


def downgrade() -> None:
    op.drop_index("ix_schedules_caller", table_name="schedules")
    op.drop_index("ix_schedules_due", table_name="schedules")
    op.drop_table("schedules")
