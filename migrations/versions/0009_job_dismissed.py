"""jobs.dismissed_at: a failed or rejected job a person accepts unretouched

A product shot the API finds no face in stays in its shoot folder; listed as needing a person,
it made every nightly run after exit 1 and its cron mail name it again. Dismissed, it is no
longer listed; retry sends it again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN: a batch (copy-and-move) alter on SQLite would drop the jobs table's
    # transition trigger with the old table.
    op.add_column("jobs", sa.Column("dismissed_at", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "dismissed_at")
