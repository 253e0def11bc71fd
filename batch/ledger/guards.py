"""The database's own guard on job states: a CHECK constraint refuses an unknown state, and a
trigger refuses a move the table of legal transitions (:data:`batch.states.TRANSITIONS`) does
not allow, whoever writes the row (a second program, a hand-made fix, a bug here).

The SQL is built from :mod:`batch.states`, so the migration that installs it and the code that
checks moves in Python agree; a test tries every illegal pair against both back-ends. A change
to the table needs a migration that makes the trigger again from a copy of the new table kept
in the migration (existing ledgers keep theirs; a test compares the newest with the code's).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from batch.states import TRANSITIONS, JobState

TRIGGER = "jobs_legal_transition"
PG_FUNCTION = "skinbatch_job_transition"
#: The message both back-ends raise; the ledger turns it into ``IllegalTransition``.
REFUSAL = "illegal job state transition"

STATE_CHECK = "state IN ({})".format(", ".join(f"'{s.value}'" for s in JobState))


def table_of(legal: Mapping[str, str]) -> dict[JobState, set[JobState]]:
    """A migration's table of legal moves, kept as text as it was at its revision (``"failed":
    "pending ready"``), as :func:`create_trigger_sql` takes it."""
    return {JobState(a): {JobState(b) for b in targets.split()} for a, targets in legal.items()}


def create_trigger_sql(dialect: str, table: Mapping[JobState, Collection[JobState]] = TRANSITIONS
                       ) -> list[str]:
    """The trigger refusing the moves ``table`` does not allow (a migration's downgrade gives
    the table of its time)."""
    legal = ", ".join(f"'{a.value}>{b.value}'" for a, targets in table.items()
                      for b in sorted(targets))
    illegal = f"OLD.state <> NEW.state AND OLD.state || '>' || NEW.state NOT IN ({legal})"
    if dialect == "postgresql":
        return [
            f"""CREATE OR REPLACE FUNCTION {PG_FUNCTION}() RETURNS trigger AS $$
BEGIN
  IF {illegal} THEN
    RAISE EXCEPTION '{REFUSAL}: % -> %', OLD.state, NEW.state
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql""",
            f"DROP TRIGGER IF EXISTS {TRIGGER} ON jobs",
            f"""CREATE TRIGGER {TRIGGER} BEFORE UPDATE OF state ON jobs
FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()""",
        ]
    return [
        f"DROP TRIGGER IF EXISTS {TRIGGER}",
        f"""CREATE TRIGGER {TRIGGER} BEFORE UPDATE OF state ON jobs
WHEN {illegal}
BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END""",
    ]


def drop_trigger_sql(dialect: str) -> list[str]:
    if dialect == "postgresql":
        return [f"DROP TRIGGER IF EXISTS {TRIGGER} ON jobs",
                f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()"]
    return [f"DROP TRIGGER IF EXISTS {TRIGGER}"]
