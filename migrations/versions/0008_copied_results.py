"""jobs: a pending job may move straight to done, its result copied from another output folder

A photo this user's runs retouched before into another output folder, under the same options,
is not paid for again: its outputs are copies of the result saved there. A job waiting to be
sent when that is found moves from pending to done; the trigger refusing illegal moves is made
again from the table that allows it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 23:30:00
"""

from __future__ import annotations

from alembic import op

from batch.ledger.guards import create_trigger_sql, table_of

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: The legal moves of this revision and of the one before (0004's), kept as they were:
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
    "failed": "pending",
    "rejected": "pending",
    "expired": "failed pending rejected submitting",
}
EARLIER = {**LEGAL, "pending": "failed rejected submitting"}


def upgrade() -> None:
    for statement in create_trigger_sql(op.get_bind().dialect.name, table_of(LEGAL)):
        op.execute(statement)


def downgrade() -> None:
    for statement in create_trigger_sql(op.get_bind().dialect.name, table_of(EARLIER)):
        op.execute(statement)
