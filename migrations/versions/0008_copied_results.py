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

from batch.ledger.guards import create_trigger_sql
from batch.states import TRANSITIONS, JobState

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in create_trigger_sql(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    earlier = {**TRANSITIONS, JobState.PENDING: TRANSITIONS[JobState.PENDING] - {JobState.DONE}}
    for statement in create_trigger_sql(op.get_bind().dialect.name, earlier):
        op.execute(statement)
