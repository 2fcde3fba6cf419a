"""The worker running a task, and the workers known to heartbeat (for lost-work recovery).

``tasks.worker`` is the Celery node name (``celery@host``) from the task's STARTED
document; ``workers`` lists every node whose heartbeat key any gateway of the deployment
has seen, and when it last saw it: only those are ever declared lost (a worker without the
taskgate library never heartbeats, and is never declared lost).

No index on ``worker``: the recovery pass reads the unfinished rows through
``ix_tasks_active``, and an index the hot path must maintain on every STARTED and
PROGRESS write would cost more than it saves.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("worker", sa.String(255), nullable=True))
    op.create_table(
        "workers",
        sa.Column("hostname", sa.String(255), primary_key=True),
        sa.Column("heartbeat_time", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("worker")
