"""workers, jobs.owner, events.worker and api_slots: several runs sharing one ledger

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN: a batch (copy-and-move) alter on SQLite would drop the jobs table's
    # transition trigger with the old table.
    op.add_column("jobs", sa.Column("owner", sa.String(128), nullable=True))
    op.create_index("ix_jobs_owner", "jobs", ["owner"])
    op.add_column("events", sa.Column("worker", sa.String(128), nullable=True))
    op.create_table(
        "workers",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
        sa.Column("taken_over_by", sa.String(128), nullable=True),
        sa.Column("taken_over_at", sa.Float(), nullable=True),
        sa.Column("taken_over_jobs", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_workers"),
    )
    op.create_table(
        "api_slots",
        sa.Column("api_base", sa.String(255), nullable=False),
        sa.Column("next_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("api_base", name="pk_api_slots"),
    )


def downgrade() -> None:
    op.drop_table("api_slots")
    op.drop_table("workers")
    op.drop_column("events", "worker")
    op.drop_index("ix_jobs_owner", "jobs")
    op.drop_column("jobs", "owner")
