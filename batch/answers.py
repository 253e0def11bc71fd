"""Upload answers a run could not record, its SQLite ledger gone with its drive or share.

Each is paid for. Left out of the ledger, its job stays ``submitting``, which the next run
takes for a lost answer and sends again, paying again. So a watch keeps them in memory while
it waits for the ledger, and a run that ends (or a watch stopped while waiting) keeps them on
this machine's own disk, beside the user's list of ledgers, until a run on that ledger
records them before it looks for lost answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from batch.elsewhere import registry
from batch.ledger import Ledger
from batch.ledger.store import StaleTransition
from batch.stages.runtime import Answered, QueuedTask
from batch.states import JobState

log = logging.getLogger("batch.answers")


def _file(ledger: Path) -> Path:
    name = hashlib.sha256(os.fsencode(ledger)).hexdigest()[:16]
    return registry().parent / "answers" / f"{name}.json"


def kept(ledger: Path | None) -> list[Answered]:
    """The answers kept for the ledger file ``ledger`` (none for a database ledger, which
    does not go away with a drive)."""
    if ledger is None:
        return []
    try:
        rows = json.loads(_file(ledger).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [Answered(QueuedTask(**row["task"]), row["content_sha256"], row["options_fp"])
            for row in rows]


def keep(ledger: Path | None, answered: list[Answered]) -> bool:
    """Keep ``answered`` for the ledger file ``ledger``, in place of what was kept for it (no
    file at all once they are recorded). False: they could not be written."""
    if ledger is None:
        return not answered
    target = _file(ledger)
    try:
        if not answered:
            target.unlink(missing_ok=True)
            return True
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_suffix(".tmp")
        temp.write_text(json.dumps([{"task": one.task._asdict(),
                                     "content_sha256": one.content_sha256,
                                     "options_fp": one.options_fp} for one in answered]),
                        encoding="utf-8")
        os.replace(temp, target)
    except OSError as exc:
        log.error("The answers of %d upload(s) could not be kept in %s: %s", len(answered),
                  target, exc.strerror or exc)
        return False
    return True


def record(ledger: Ledger, answered: list[Answered]) -> int:
    """Record ``answered`` as queued, taking each off the list once it is settled: recorded,
    or found moved meanwhile, or of a job this ledger does not hold (a ledger started anew
    in its place: a task must never be saved as another photo's result). Returns how many
    were recorded."""
    recorded = 0
    for one in list(answered):
        with contextlib.suppress(StaleTransition, KeyError):
            job = ledger.job(one.task.job_id)
            if (job.content_sha256, job.options_fp) == (one.content_sha256, one.options_fp):
                ledger.transition(one.task.job_id, JobState.QUEUED, **one.task.move())
                recorded += 1
        answered.remove(one)
    return recorded
