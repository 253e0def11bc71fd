"""Putting chosen jobs back in line for the next run (the ``retry`` command)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from batch.ledger import open_ledger
from batch.locking import RunLock
from batch.states import RETRYABLE, JobState


def requeue(out: Path, ledger_location: str, states: Iterable[JobState],
            paths: Sequence[Path] = ()) -> int:
    """Move the jobs in ``states`` (only those of the files at ``paths``, when given) back to
    pending, under the run lock so no run is changing them meanwhile. Returns how many moved.
    Resubmitting an ambiguous or expired job may pay for it again; the ledger counts it."""
    chosen = frozenset(states)
    if not chosen or not chosen <= RETRYABLE:
        raise ValueError(f"only {', '.join(sorted(RETRYABLE))} jobs can be put back in line")
    with RunLock(out.resolve(), ledger_location):
        ledger = open_ledger(ledger_location)
        try:
            return ledger.reset_jobs(chosen, "put back in line by skinbatch retry",
                                     [str(p.resolve()) for p in paths])
        finally:
            ledger.close()
