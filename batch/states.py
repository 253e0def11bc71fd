"""Job states and the only table of legal transitions between them.

Every state change in the ledger goes through :meth:`batch.ledger.store.Ledger.transition`,
which checks it against :data:`TRANSITIONS` and writes a history row.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class JobState(StrEnum):
    PENDING = "pending"
    """Known and waiting for the submitter; not yet sent (or provably not received)."""
    SUBMITTING = "submitting"
    """Committed just before the upload starts; the API's answer is awaited."""
    AMBIGUOUS = "ambiguous"
    """The upload went out but its answer was lost: it may or may not have been charged."""
    QUEUED = "queued"
    """Accepted: ``task_id`` is known, the task waits in the provider's queue (status 0)."""
    PROCESSING = "processing"
    """The provider is working on it (status 1)."""
    READY = "ready"
    """Completed (status 2): result URLs are known and not yet downloaded."""
    DOWNLOADING = "downloading"
    """The result is being written into the output folder."""
    DONE = "done"
    """Every output of the job is on disk, complete and verified."""
    FAILED = "failed"
    """A permanent error for this image; the reason and API code are recorded."""
    REJECTED = "rejected"
    """Never sent: the input is unusable (not an image, corrupt, unreadable, over the limits)."""
    EXPIRED = "expired"
    """The result links outlived their 24 hours before the result was saved."""


S = JobState

TRANSITIONS: Final[dict[JobState, frozenset[JobState]]] = {
    S.PENDING: frozenset({S.SUBMITTING, S.REJECTED, S.FAILED}),
    S.SUBMITTING: frozenset({S.QUEUED, S.PENDING, S.AMBIGUOUS, S.FAILED, S.REJECTED}),
    S.AMBIGUOUS: frozenset({S.SUBMITTING, S.PENDING, S.FAILED, S.REJECTED}),
    S.QUEUED: frozenset({S.PROCESSING, S.READY, S.FAILED, S.EXPIRED}),
    S.PROCESSING: frozenset({S.READY, S.FAILED, S.EXPIRED}),
    S.READY: frozenset({S.DOWNLOADING, S.EXPIRED, S.FAILED}),
    S.DOWNLOADING: frozenset({S.DONE, S.READY, S.FAILED, S.EXPIRED}),
    S.DONE: frozenset({S.READY, S.EXPIRED}),
    S.FAILED: frozenset({S.PENDING}),
    S.REJECTED: frozenset({S.PENDING}),
    S.EXPIRED: frozenset({S.PENDING, S.SUBMITTING, S.FAILED, S.REJECTED}),
}

#: States a job can rest in when a run ends with nothing more to do for it.
FINAL: Final = frozenset({S.DONE, S.FAILED, S.REJECTED})
#: States in which the provider holds (or may hold) a paid task for the job.
PAID: Final = frozenset({S.QUEUED, S.PROCESSING, S.READY, S.DOWNLOADING})
#: Moves into these states need not wait for the disk: if a power cut loses one, the job is
#: back where it was and the next run redoes the step for free (a status query, a download
#: whose link is still valid). Every other move (an upload about to start or answered, a
#: result saved, a final verdict) is flushed before the run goes on. WAL order means the next
#: flushed move makes the earlier ones durable too.
REDONE_IF_LOST: Final = frozenset({S.PROCESSING, S.READY, S.DOWNLOADING})


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: int, current: str, target: str) -> None:
        super().__init__(f"job {job_id}: illegal transition {current} -> {target}")
        self.job_id, self.current, self.target = job_id, current, target


def check_transition(job_id: int, current: JobState | str, target: JobState) -> None:
    if target not in TRANSITIONS[JobState(current)]:
        raise IllegalTransition(job_id, str(current), str(target))
