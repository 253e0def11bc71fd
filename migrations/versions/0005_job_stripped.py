"""jobs.stripped: the metadata removed from a file before upload

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN: a batch (copy-and-move) alter on SQLite would drop the jobs table's
    # transition trigger with the old table.
    op.add_column("jobs", sa.Column("stripped", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "stripped")
