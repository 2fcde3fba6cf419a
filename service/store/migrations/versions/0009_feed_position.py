"""The state feed's position of the newest state written to a task.

With several gateway replicas, the feed's entries go to whichever replica reads them, so
two states of one task can be written in the other order (and an entry taken over from a
dead replica is written late). Each update from the feed carries its entry's position in
the stream (``TaskUpdate.feed_position``); an unfinished task takes an update from the feed
only when it is newer than the last one written (``service/store/transition.py``), so a
progress never goes back. NULL: no state from the feed yet. A nullable column without a
default: adding it rewrites nothing.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("feed_position", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "feed_position")
