"""Job states, the one table of legal transitions, and every named group of states.

Every state change in the ledger goes through :meth:`batch.ledger.store.Ledger.transition`,
which checks it against :data:`TRANSITIONS` and writes a history row; the database refuses an
unknown state (a CHECK constraint) and an illegal move (a trigger built from this table, see
:mod:`batch.ledger.guards`).
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
    """The result links outlived their 24 hours (or the task was lost) before it was saved."""


S = JobState

TRANSITIONS: Final[dict[JobState, frozenset[JobState]]] = {
    S.PENDING: frozenset({S.SUBMITTING, S.REJECTED, S.FAILED, S.DONE}),
    S.SUBMITTING: frozenset({S.QUEUED, S.PENDING, S.AMBIGUOUS, S.FAILED, S.REJECTED}),
    S.AMBIGUOUS: frozenset({S.SUBMITTING, S.PENDING, S.FAILED, S.REJECTED}),
    S.QUEUED: frozenset({S.PROCESSING, S.READY, S.FAILED, S.EXPIRED}),
    S.PROCESSING: frozenset({S.READY, S.FAILED, S.EXPIRED}),
    S.READY: frozenset({S.DOWNLOADING, S.EXPIRED, S.FAILED}),
    S.DOWNLOADING: frozenset({S.DONE, S.READY, S.FAILED, S.EXPIRED}),
    S.DONE: frozenset({S.READY, S.EXPIRED}),
    S.FAILED: frozenset({S.PENDING, S.READY}),
    S.REJECTED: frozenset({S.PENDING}),
    S.EXPIRED: frozenset({S.PENDING, S.SUBMITTING, S.FAILED, S.REJECTED}),
}

#: States a job rests in when a run has nothing more to do for it.
FINAL: Final = frozenset({S.DONE, S.FAILED, S.REJECTED})
#: Anything else: the batch is not finished while a job rests here.
UNFINISHED: Final = frozenset(JobState) - FINAL
#: The provider holds a task for the job that the poller asks about.
OPEN: Final = frozenset({S.QUEUED, S.PROCESSING})
#: Paid work still to finish: a task to poll, a result to save, an answer awaited.
IN_FLIGHT: Final = frozenset({S.SUBMITTING, S.QUEUED, S.PROCESSING, S.READY, S.DOWNLOADING})
#: Needs a person or a policy before it can go on (listed as a problem).
NEEDS_ATTENTION: Final = frozenset({S.FAILED, S.REJECTED, S.AMBIGUOUS, S.EXPIRED})
#: Ended without a result for the photo itself (no face in a product shot): what a person
#: may accept unretouched (``skinbatch dismiss``), as no run would change the outcome.
DISMISSABLE: Final = frozenset({S.FAILED, S.REJECTED})
#: What ``skinbatch retry`` may put back in line.
RETRYABLE: Final = frozenset({S.FAILED, S.REJECTED, S.AMBIGUOUS, S.EXPIRED})
#: Moves into these states need not wait for the disk: if a power cut loses one, the job is
#: back where it was and the next run redoes the step for free (a status query, a download
#: whose link is still valid). Every other move (an upload about to start or answered, a
#: result saved, a final verdict) is flushed before the run goes on. WAL order means the next
#: flushed move makes the earlier ones durable too.
REDONE_IF_LOST: Final = frozenset({S.PROCESSING, S.READY, S.DOWNLOADING})


def submittable(on_ambiguous: str, on_expired: str) -> frozenset[JobState]:
    """States the submitter sends from, under the run's policies: a lost answer or an expired
    result is sent again (a possible second charge, recorded) only when the policy says so."""
    states = {S.PENDING}
    if on_ambiguous == "resubmit":
        states.add(S.AMBIGUOUS)
    if on_expired == "resubmit":
        states.add(S.EXPIRED)
    return frozenset(states)


def illegal_pairs() -> list[tuple[JobState, JobState]]:
    """Every (from, to) move the table forbids (a state to itself is not a move)."""
    return [(a, b) for a in JobState for b in JobState if a is not b and b not in TRANSITIONS[a]]


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: int, current: str, target: str) -> None:
        super().__init__(f"job {job_id}: illegal transition {current} -> {target}")
        self.job_id, self.current, self.target = job_id, current, target


def check_transition(job_id: int, current: JobState | str, target: JobState) -> None:
    if target not in TRANSITIONS[JobState(current)]:
        raise IllegalTransition(job_id, str(current), str(target))
