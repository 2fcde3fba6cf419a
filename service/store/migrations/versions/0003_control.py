"""Control: the cancel request mark, and the indexes ListTasks pages through.

``cancel_requested`` is set by CancelTask (``service/store/cancel.py``). ListTasks orders by
``(create_time, task_id)`` and reads one page from an index whatever the table size: every
caller's tasks (``ix_tasks_list``), one caller's (``ix_tasks_list_caller``: read isolation),
one state's (``ix_tasks_list_state``: the common selective filter).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "tasks", sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.create_index("ix_tasks_list", "tasks", ["create_time", "task_id"])
    op.create_index("ix_tasks_list_caller", "tasks", ["caller", "create_time", "task_id"])
    op.create_index("ix_tasks_list_state", "tasks", ["state", "create_time", "task_id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_list_state", table_name="tasks")
    op.drop_index("ix_tasks_list_caller", table_name="tasks")
    op.drop_index("ix_tasks_list", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("cancel_requested")
