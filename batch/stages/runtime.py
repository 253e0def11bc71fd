"""What the stages share during one run: ledger, client, settings, why uploads stopped, the
channel from the submitter to the poller, and wake-ups. Stages import this, never each other."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from batch import apispec
from batch.api import ApiClient, ApiError, ErrorKind
from batch.api.breaker import CircuitBreaker
from batch.api.retry import backoff_delay
from batch.budget import Allowance, Budget
from batch.config import RunConfig
from batch.elsewhere import Elsewhere
from batch.ledger import Ledger, LedgerUnwritable, TransitionInfo
from batch.ledger.store import FileRow, JobRow
from batch.ledger.writer import LedgerWriter
from batch.progress import Progress
from batch.scan import AWAY, SourceRoot
from batch.states import JobState

log = logging.getLogger("batch")


#: Uploads a run pays for before it has saved a result: until one comes through, a result host
#: this network cannot reach (a firewall's list of allowed hosts, a DNS filter, a proxy that
#: does not trust its certificate) costs at most these credits, not the night's batch. The
#: rest wait about one task's time, once a run.
UNPROVEN_UPLOADS = 20

#: How often a watch looks for a folder or file that went away (its output folder, a source
#: folder its results wait for, its ledger): each look is a stat.
GONE_RECHECK = 5.0


class SourceGone(FileNotFoundError):
    """None of a job's photos is there, nor the source folder they lie in (a drive unplugged,
    a share unmounted). A run stops: the photos not sent would be rejected one by one, and a
    result saved now would lack its photo's metadata (its colour profile, capture time,
    copyright) and the scaling back to its size, for good. A photo deleted from a folder
    still there is forgotten before it is sent, or gets its result without them."""

    def __init__(self, folder: str) -> None:
        super().__init__(errno.ENOENT, f"the source folder {folder} is gone (a drive "
                                       "unplugged, a share unmounted?)")
        self.folder = folder

    def stop_words(self) -> str:
        return (f"The source folder {self.folder} is gone (a drive unplugged, a share "
                "unmounted?): the results paid for are kept, and the same command saves them, "
                "with their photos' metadata, once it is back.")


def source_gone(targets: list[FileRow]) -> str | None:
    """The folder of ``targets`` when it is gone with every one of them, else None."""
    if not targets or any(os.path.exists(Path(t.root, t.rel_path)) for t in targets):
        return None
    return None if os.path.isdir(targets[0].root) else targets[0].root


class StopReason(StrEnum):
    """Why no new upload may start. Paid work is still polled and saved unless the run is
    aborting (see :attr:`Flags.abort`)."""

    INTERRUPTED = "interrupted"
    BUDGET = "budget reached"
    CLOCK = "stop-submitting time reached"
    DISK = "the disk is nearly full"
    UNFETCHED = "results paid for cannot be fetched from the result host"
    LOST = "the API lost tasks it had just accepted"
    OUTPUT = "the output folder is gone (a drive unplugged, a share unmounted)"
    DEADLINE = "deadline reached"
    ACCOUNT = "account problem"
    FATAL = "the run cannot go on"


#: Stops that leave jobs waiting for a later run (their reason is written on them).
WAITING_STOPS = frozenset({StopReason.BUDGET, StopReason.CLOCK, StopReason.DEADLINE,
                           StopReason.DISK, StopReason.UNFETCHED, StopReason.LOST,
                           StopReason.OUTPUT, StopReason.ACCOUNT})


@dataclass
class Flags:
    #: Why no new uploads may start, or None.
    submits_stopped: StopReason | None = None
    #: The account-level error that stopped the run, if any.
    account_error: ApiError | None = None
    #: A local error that stops the run (e.g. the output folder cannot be written).
    fatal: str | None = None
    interrupted: bool = False
    #: Wind down now (bad key, fatal error): claim nothing new. Uploads under way still get
    #: their answer, so stopping never turns a paid upload into an ambiguous one.
    abort: bool = False
    #: A second Ctrl-C: do not even wait for uploads under way.
    hard_stop: bool = False
    #: The --deadline passed: the run ends with work still in flight.
    deadline_reached: bool = False
    #: Uploads the API failed up to the attempt limit (while it answered the balance), and one
    #: went through since: a watch tries them once more (a run's start does).
    given_up: bool = False
    uploads_back: bool = False


class QueuedTask(NamedTuple):
    """The task an upload was answered with. The submitter records it as queued, and the
    poller takes it from here at once instead of waiting for its next look at the ledger
    (which stays the truth)."""

    job_id: int
    task_id: str
    submitted_at: float
    expires_at: float
    request_id: str | None = None
    log_id: str | None = None

    def move(self) -> dict[str, Any]:
        """The job's move to queued (:meth:`batch.ledger.Ledger.transition`'s arguments)."""
        return {"expect": JobState.SUBMITTING, "task_id": self.task_id,
                "submitted_at": self.submitted_at, "expires_at": self.expires_at,
                "attempts": 0, "next_attempt_at": 0.0, "charge": True, "reason": None,
                "info": TransitionInfo(http_status=200, request_id=self.request_id,
                                       log_id=self.log_id)}


class Answered(NamedTuple):
    """An upload answered once the ledger had gone with its drive: its task, paid for, and
    the job's identity, so that only the job it was sent for records it (see
    :mod:`batch.answers`)."""

    task: QueuedTask
    content_sha256: str
    options_fp: str


def info_of(error: ApiError) -> TransitionInfo:
    """What an API error tells the ledger."""
    return TransitionInfo(http_status=error.http_status, error_code=error.code,
                          request_id=error.request_id, log_id=error.log_id,
                          message=error.describe())


@dataclass
class Runtime:
    ledger: Ledger
    client: ApiClient
    config: RunConfig
    out_dir: Path
    progress: Progress
    breaker: CircuitBreaker
    #: Every ledger write the stages make goes through it, off the event loop's thread.
    writes: LedgerWriter
    #: This run's name among the ledger's workers: the owner of the jobs it claims.
    worker: str | None = None
    #: When the run began (time.time(), as an upload's submitted_at): its uploads are since.
    started: float = field(default_factory=time.time)
    #: The run's sources: the scan walks them, and on a shared ledger the worker claims only
    #: jobs with a file under one of them.
    sources: tuple[SourceRoot, ...] = ()
    #: A watch, which runs for days: what would end a night's run, it waits out.
    watching: bool = False
    budget: Allowance | None = None
    #: The account's balance as read before the first upload (None: not read).
    balance: float | None = None
    #: Reads the balance and sets what the run may spend, if that waits for the first upload
    #: (the pipeline's; run once, by :meth:`before_upload`).
    check_money: Callable[[], Awaitable[None]] | None = None
    _money_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The uploads the batch needs, once a scan that ran beside the uploads has counted them.
    to_pay: int | None = None
    flags: Flags = field(default_factory=Flags)
    rng: random.Random = field(default_factory=random.Random)
    wake_submitter: asyncio.Event = field(default_factory=asyncio.Event)
    wake_poller: asyncio.Event = field(default_factory=asyncio.Event)
    wake_downloader: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Submitter -> poller.
    queued: asyncio.Queue[QueuedTask] = field(default_factory=asyncio.Queue)
    #: Uploads answered once the ledger had gone with its drive, paid for: recorded when it
    #: is back (see :mod:`batch.answers`).
    unrecorded: list[Answered] = field(default_factory=list)
    #: Jobs claimed for upload that have not started yet (more uploads still to come).
    uploads_waiting: int = 0
    #: Bumped when this worker took over a dead one's jobs (the poller looks for its tasks).
    takeovers: int = 0
    #: Folders of the ledger's photos that are not there (a drive unplugged, a share not
    #: mounted), by the ledger's name for them: a run goes on with its other sources (see
    #: :meth:`goes_on_without`), and claims and counts leave these out.
    away: set[str] = field(default_factory=set)
    #: A result was saved in this run: the host results come from can be reached (see
    #: :data:`UNPROVEN_UPLOADS`).
    delivered: bool = False
    #: This user's other ledgers, asked about each photo the scan finds new, and for the
    #: results copied from them (None: --pay-again, or a run on a shared ledger).
    elsewhere: Elsewhere | None = None

    async def before_upload(self) -> None:
        """Money is decided before the first upload: a run with nothing to send reads no
        balance."""
        if self.check_money is None:
            return
        async with self._money_lock:
            if self.check_money is not None:
                await self.check_money()
                self.check_money = None

    @property
    def balance_to_come(self) -> bool:
        """Whether the first upload's balance read is still to come (or under way)."""
        return self.check_money is not None or self._money_lock.locked()

    @property
    def roots(self) -> tuple[str, ...]:
        """The sources there, as the ledger names them (``files.root``)."""
        return tuple(source.ledger_root for source in self.sources
                     if source.ledger_root not in self.away)

    def count(self, states: Iterable[JobState], *, redone: bool = False,
              sent_since: float | None = None) -> int:
        """Jobs in ``states`` this run works on: a file under its sources on a shared ledger,
        none only under a folder that is away (see :meth:`Ledger.count_in`)."""
        return self.ledger.count_in(states, self.roots, redone=redone, away=self.away,
                                    sent_since=sent_since)

    def claimable(self, states: Iterable[JobState], limit: int, *, exclude: Iterable[int],
                  soonest_expiry_first: bool = False) -> list[JobRow]:
        """The next jobs in ``states`` this run works on, taken for it on a shared ledger
        (see :meth:`Ledger.claimable`)."""
        return self.ledger.claimable(states, limit, exclude=exclude,
                                     soonest_expiry_first=soonest_expiry_first,
                                     owner=self.worker, roots=self.roots, away=self.away)

    async def balance_fails(self) -> ErrorKind | None:
        """How a balance read (which costs nothing) fails now, or None when it is answered:
        what tells a request's failure from the API's or the line's (see the downloader's and
        the submitter's attempt limits)."""
        try:
            await self.client.credits()
        except ApiError as error:
            return error.kind
        return None

    async def goes_on_without(self, folder: str) -> bool:
        """Whether the run goes on without ``folder`` (a source, or the folder of photos an
        earlier command sent) that is not there: a run, while one of its sources is (a watch
        waits for it in its own way). Its photos and results wait for a run that finds it,
        which also takes it out of the ledger's list of folders not read."""
        root = self.config.root_map.key_for(folder) or folder
        if root in self.away:
            return True
        if self.watching or not any(s.ledger_root != root and os.path.isdir(s.base)
                                    for s in self.sources if s.ledger_root not in self.away):
            return False
        self.away.add(root)
        if any(s.ledger_root == root for s in self.sources):
            await asyncio.to_thread(self.ledger.note_unreadable, root, [("", AWAY)])
        log.warning("%s is %s. Its photos and their results wait for a run that finds it; the "
                    "other sources go on.", folder, AWAY)
        return True

    def reaches(self, root: str) -> bool:
        """Whether this worker writes outputs for files under ``root`` (on a shared ledger,
        another site's files are that site's to save)."""
        return not self.ledger.shared or root in self.roots

    async def wait_for_ledger(self, error: Exception) -> None:
        """A stage's read found the shared ledger's database away (restarted, network gone):
        a pause, not a failure. The heartbeat stops the worker if it stays away longer than
        the lease. Any other error is raised."""
        if not self.ledger.away(error):
            raise error
        self.ledger.said_away(error)
        await asyncio.sleep(1.0)

    def took_over(self) -> None:
        self.takeovers += 1
        for event in (self.wake_submitter, self.wake_poller, self.wake_downloader, self.changed):
            event.set()

    def backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, base=self.config.backoff_base, cap=self.config.backoff_cap,
                             rng=self.rng)

    def account_stop(self, error: ApiError) -> None:
        """Out of credits: no more uploads, finish what is paid. Anything else: stop now."""
        if self.flags.account_error is None:
            self.flags.account_error = error
            log.error("Stopping: %s", error.describe())
            if self.watching and error.out_of_credits:
                log.warning("Watching goes on: new photos are recorded, and uploads resume "
                            "once the account is topped up (its balance is read at each "
                            "--rescan).")
        self.flags.submits_stopped = StopReason.ACCOUNT
        if not error.out_of_credits:
            self.flags.abort = True
        self.changed.set()

    def credits_again(self, balance: float | None) -> None:
        """The account that stopped the uploads has credits again (a watch runs for days, and
        someone topped it up): uploads resume. A bound set by the old balance gives way to
        what is left of --max-credits; the API's own answer bounds the new balance."""
        if self.flags.submits_stopped is not StopReason.ACCOUNT:
            return
        self.balance = balance
        self.flags.account_error = None
        if isinstance(self.budget, Budget) and self.budget.by_balance:
            limit = self.config.budget
            self.budget = None if limit is None else Budget(limit - self.budget.spent)
        self.resume(StopReason.ACCOUNT, "The account has "
                    f"{'some' if balance is None else f'{balance:g}'} credit(s) again")

    def stop_submitting(self, reason: StopReason, why: str | None = None) -> None:
        """No new uploads (budget, clock, a disk nearly full); paid work is still polled and
        saved. ``why``, when given, is said instead of the reason's name (how full the disk is)."""
        if self.flags.submits_stopped is None:
            self.flags.submits_stopped = reason
            log.warning("No more uploads: %s.", why or reason.value)
        self.changed.set()

    def resume(self, reason: StopReason, why: str) -> None:
        """What stopped the uploads for ``reason`` is over (someone made room on the disk, the
        result host serves results again): they start again."""
        if self.flags.submits_stopped is reason:
            self.flags.submits_stopped = None
            log.warning("%s: uploads resume.", why)
            self.wake_submitter.set()

    def budget_spent(self) -> None:
        """The run's allowance is used up: by the balance (an account stop) or the budget."""
        if self.budget is not None and self.budget.by_balance:
            self.account_stop(ApiError(ErrorKind.ACCOUNT, "the account is out of credits",
                                       code=apispec.NOT_ENOUGH_CREDITS))
        else:
            self.stop_submitting(StopReason.BUDGET)

    def expired(self) -> None:
        """A paid result lost before it was saved: sent again, or out of this run's totals."""
        if self.config.on_expired == "resubmit":
            self.progress.add_work(1, 0)
        else:
            self.progress.dropped(uploaded=True)

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: no new uploads, those under way get their answer; a second one
        stops at once."""
        if self.flags.interrupted:
            self.flags.abort = self.flags.hard_stop = True
        self.flags.interrupted = True
        self.flags.submits_stopped = StopReason.INTERRUPTED
        self.changed.set()

    def job_ended(self, task: asyncio.Task[None]) -> None:
        """A job's upload, poll or download that raised takes the run with it: an error no
        one looks at is lost, and its job would be claimed again and again. A shared ledger's
        database away is not such an error: the heartbeat judges it (past the lease, it stops
        the worker), and the job is claimed again once it is back."""
        if task.cancelled() or (error := task.exception()) is None or self.ledger.away(error):
            return
        if isinstance(error, LedgerUnwritable):
            self.fail_run(str(error))
            return
        if (gone := self.ledger.gone()) is not None:  # its error is only the symptom
            self.fail_run(f"{gone}.")
            return
        log.error("%s stopped on an unexpected error:", task.get_name(), exc_info=error)
        self.fail_run(f"The run stopped on an unexpected error ({type(error).__name__}: "
                      f"{error}); what was paid for is recorded: run the same command again.")

    def fail_run(self, message: str) -> None:
        if self.flags.fatal is None:
            self.flags.fatal = message
            log.error("%s", message)
        if self.flags.submits_stopped not in WAITING_STOPS:  # else the photos not sent keep it
            self.flags.submits_stopped = StopReason.FATAL
        self.flags.abort = True
        self.changed.set()


async def wait_any(event: asyncio.Event, tasks: set[asyncio.Task[None]],
                   timeout: float) -> bool:
    """Sleep until ``event`` is set, one of ``tasks`` finishes, or ``timeout`` passes.
    Returns whether the event was set (and clears it)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, *tasks}, timeout=max(0.0, timeout),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    was_set = event.is_set()
    event.clear()
    return was_set
