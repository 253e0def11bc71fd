"""meta identity = file: a ledger with jobs keeps identifying photos by their files' bytes

A new ledger identifies a photo by its image (the bytes its upload is made from, less the
metadata it is sent without, and its orientation), so that a caption written into a
delivered photo does not pay for it again. A ledger that already has jobs keyed by the whole
file's hash keeps that key: re-keyed, a copy of a photo it paid for would be paid again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 04:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    if conn.execute(sa.text("SELECT 1 FROM jobs LIMIT 1")).first() is not None:
        conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('identity', 'file')"))


def downgrade() -> None:
    op.get_bind().execute(sa.text("DELETE FROM meta WHERE key = 'identity'"))
