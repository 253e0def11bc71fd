"""folders: one digest per scanned folder, for stat-only re-scans without per-file lookups

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 15:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "folders",
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("rel_dir", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("root", "rel_dir", name=op.f("pk_folders")),
    )


def downgrade() -> None:
    op.drop_table("folders")
