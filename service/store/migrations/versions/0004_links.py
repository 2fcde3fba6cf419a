"""What a task belongs to: the schedule that fired it, the workflow it is a step of, and
whether it was adopted (sent around the gateway and recorded from the result backend).

Both links are NULL for plain tasks; their ListTasks indexes are partial, so plain
inserts do not pay for them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("schedule_id", sa.String(255), nullable=True))
    op.add_column("tasks", sa.Column("workflow_id", sa.String(64), nullable=True))
    op.add_column("tasks", sa.Column("adopted", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_index(
        "ix_tasks_list_schedule",
        "tasks",
        ["schedule_id", "create_time", "task_id"],
        postgresql_where=sa.text("schedule_id IS NOT NULL"),
        sqlite_where=sa.text("schedule_id IS NOT NULL"),
    )
    op.create_index(
        "ix_tasks_list_workflow",
        "tasks",
        ["workflow_id", "create_time", "task_id"],
        postgresql_where=sa.text("workflow_id IS NOT NULL"),
        sqlite_where=sa.text("workflow_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_list_workflow", table_name="tasks")
    op.drop_index("ix_tasks_list_schedule", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("adopted")
        batch.drop_column("workflow_id")
        batch.drop_column("schedule_id")
