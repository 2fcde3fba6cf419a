"""Operations: the retention index (terminal tasks by their last change).

``TASKGATE_RETENTION`` deletes terminal tasks last updated before a cut-off, in small
batches (service/store/operations.py); this partial index finds them without reading the
unfinished ones, and costs an insert nothing (new tasks are never terminal).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TERMINAL = "state IN ('CANCELLED', 'FAILED', 'SUCCEEDED')"


def upgrade() -> None:
    op.create_index(
        "ix_tasks_retention",
        "tasks",
        ["update_time"],
        postgresql_where=sa.text(_TERMINAL),
        sqlite_where=sa.text(_TERMINAL),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_retention", table_name="tasks")
