"""jobs.state: a CHECK of the known states and a trigger refusing illegal transitions

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from alembic import op

from batch.ledger.guards import STATE_CHECK, create_trigger_sql, drop_trigger_sql, table_of

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: The legal moves of this revision, kept as they were: a later one that changes the table
#: makes the trigger again from it (as 0008 does).
LEGAL = {
    "pending": "failed rejected submitting",
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
TABLE = table_of(LEGAL)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table("jobs") as batch:
        batch.create_check_constraint(op.f("ck_jobs_state"), STATE_CHECK)
    for statement in create_trigger_sql(dialect, TABLE):
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in drop_trigger_sql(dialect):
        op.execute(statement)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_state", type_="check")
