"""jobs: a failed job whose result is paid for and whose link lives may go back to ready

A photo failed for its download (a result over the size cap, a host that kept failing while
the others were saved) is paid for. ``skinbatch retry --failed`` downloads it again while its
link lives instead of sending the photo and paying for it a second time; the trigger refusing
illegal moves is made again from the table that allows failed -> ready.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 16:40:00
"""

from __future__ import annotations

from alembic import op

from batch.ledger.guards import create_trigger_sql, table_of

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: The legal moves of this revision and of the one before (0008's), kept as they were:
#: a later revision that changes the table must change neither.
LEGAL = {
    "pending": "done failed rejected submitting",
    "submitting": "ambiguous failed pending queued rejected",
    "ambiguous": "failed pending rejected submitting",
    "queued": "expired failed processing ready",
    "processing": "expired failed ready",
    "ready": "downloading expired failed",
    "downloading": "done expired failed ready",
    "done": "expired ready",
    "failed": "pending ready",
    "rejected": "pending",
    "expired": "failed pending rejected submitting",
}
EARLIER = {**LEGAL, "failed": "pending"}


def upgrade() -> None:
    for statement in create_trigger_sql(op.get_bind().dialect.name, table_of(LEGAL)):
        op.execute(statement)


def downgrade() -> None:
    for statement in create_trigger_sql(op.get_bind().dialect.name, table_of(EARLIER)):
        op.execute(statement)
