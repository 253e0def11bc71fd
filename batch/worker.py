"""This run as one worker of its ledger: a name, a lease its heartbeat renews every second, the
jobs of workers whose lease lapsed taken over, and the API's request rate shared with the
others.

Several runs on one PostgreSQL ledger are several workers; a SQLite ledger has one at a time
(its file lock), which takes over whatever the last one left. Leases are judged by the
database's clock, so machines whose clocks disagree still agree on who is alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import SQLAlchemyError

from batch.ledger import Ledger, LedgerUnwritable
from batch.ledger.workers import OptionsDiffer, WorkerNameTaken, WorkerRecords, WorkerRow
from batch.locking import LedgerBusy
from batch.options import Options

log = logging.getLogger("batch.worker")
#: How often the lease is renewed and the other workers looked at.
BEAT_SECONDS = 1.0


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def died_here(worker: WorkerRow) -> bool:
    """A worker of this machine whose process is gone (killed): dead now, whatever its lease
    says."""
    return worker.host == socket.gethostname() and not _running(worker.pid)


def at_work(ledger: Ledger) -> list[WorkerRow]:
    """The runs at work on the ledger now: their leases live, less this machine's killed
    processes."""
    return [w for w in WorkerRecords(ledger).listing() if w.live and not died_here(w)]


def options_refusal(batch: str, options: Options) -> str:
    """Why a worker with ``options`` may not join a batch whose live workers retouch under
    ``batch`` (their fingerprint)."""
    return (f"The workers on this ledger retouch with "
            f"{Options.from_fingerprint(batch).describe()}; this one was started with "
            f"{options.describe()}. Two sets of options on one batch pay for every photo twice, "
            "its output flipping between them: start it with the same options (the same "
            "config file), or give it a ledger of its own.")


def joins_other_options(ledger: Ledger, options: Options) -> str | None:
    """What :meth:`Worker.register` would refuse a worker with ``options`` on this shared
    ledger for, read without joining (the dry run)."""
    batch = WorkerRecords(ledger).options_in_force()
    return None if batch in (None, options.fingerprint) else options_refusal(batch, options)


class Worker:
    """Register with :meth:`register`, :meth:`recover` what dead workers left, run the heartbeat
    with :meth:`start`, and hand the jobs back with :meth:`stop`."""

    def __init__(self, ledger: Ledger, name: str | None, lease_seconds: float) -> None:
        self.ledger, self.lease = ledger, lease_seconds
        self.records = WorkerRecords(ledger)
        self.name = name or default_name()
        #: Workers whose jobs this one took over (their partial files are its to remove).
        self.taken: list[str] = []
        ledger.patience = lease_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.live = 1

    def register(self, budget: int | None = None, options: Options | None = None) -> int | None:
        """Join the ledger's workers; with a ``budget`` (--max-credits), returns the one in
        force for the batch this worker joins (its own, if it is the first). With ``options``,
        a batch whose workers retouch under others is refused (:class:`LedgerBusy`). Only a
        shared ledger has a batch of workers: on one run's own, both are left to the run."""
        if not self.ledger.shared:
            budget = options = None
        try:
            in_force = self.records.register(self.name, socket.gethostname(), os.getpid(),
                                             self.lease, budget,
                                             None if options is None else options.fingerprint)
        except WorkerNameTaken:
            raise LedgerBusy(f"A worker named {self.name!r} is already working on this ledger; "
                             "give this run another --worker-name. Nothing was sent by this "
                             "one.") from None
        except OptionsDiffer as differ:
            assert options is not None
            raise LedgerBusy(f"{options_refusal(differ.fingerprint, options)} Nothing was sent "
                             "by this one.") from None
        self.live = self._count_live()
        return in_force

    def recover(self) -> dict[str, int]:
        """At start: what dead runs left half-done. On a SQLite ledger every earlier run is
        dead (this one holds the file lock); on a shared ledger, those whose lease lapsed and
        those of this machine whose process is gone (a restart after a crash need not wait
        for the lease)."""
        counts = self.ledger.recover_interrupted()  # jobs no worker held
        dead = set(self.records.lapsed(self.name, all_others=not self.ledger.shared))
        dead |= {w.name for w in self.records.listing()
                 if w.live and w.name != self.name and died_here(w)}
        for name in sorted(dead):
            self._take_over(name)
        self.live = self._count_live()
        return counts

    def alone(self) -> bool:
        return self.live <= 1

    def start(self, on_taken: Callable[[], None], on_lost: Callable[[str], None],
              on_live: Callable[[int, int], None]) -> None:
        """The heartbeat, in a thread of its own so that a busy event loop never lets the lease
        lapse. ``on_taken``: jobs were taken over from a dead worker; ``on_lost``: this worker
        must stop (its lease lapsed); ``on_live(before, now)``: the count of live workers
        changed."""
        self._thread = threading.Thread(target=self._beat, args=(on_taken, on_lost, on_live),
                                        name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, on_taken: Callable[[], None], on_lost: Callable[[str], None],
              on_live: Callable[[int, int], None]) -> None:
        last_ok = time.monotonic()
        healthy_since = last_ok - self.lease  # a new worker may take over lapsed ones at once
        while not self._stop.wait(BEAT_SECONDS):
            now = time.monotonic()
            try:
                if not self.records.beat(self.name):
                    on_lost(f"this worker ({self.name}) was silent longer than its lease and "
                            "another worker took its jobs over; stopping")
                    return
                self.ledger.said_back()
                if now - last_ok > 2 * BEAT_SECONDS:
                    # Others may not have renewed their leases either (the database was away,
                    # or this machine slept): give them a lease's time to do so before taking
                    # theirs for lapsed.
                    healthy_since = now
                last_ok = now
                if now - healthy_since >= self.lease and [
                        dead for dead in self.records.lapsed(self.name) if self._take_over(dead)]:
                    on_taken()
                live = self._count_live()
                if live != self.live:
                    on_live(self.live, live)
                    self.live = live
            except LedgerUnwritable as unwritable:
                on_lost(str(unwritable))
                return
            except SQLAlchemyError as error:
                if now - last_ok > self.lease:
                    on_lost(f"the ledger database has been unreachable for longer than the "
                            f"lease ({self.lease:g} s): stopping, so that another worker may "
                            f"take this one's jobs over "
                            f"({type(getattr(error, 'orig', None) or error).__name__})")
                    return
                self.ledger.said_away(error)

    def _take_over(self, dead: str) -> bool:
        taken = self.records.take_over(dead, self.name)
        if taken is None:
            return False
        if self.ledger.shared:
            log.warning("Worker %s stopped renewing its lease; took over its %d job(s).",
                        dead, taken)
        else:  # one run at a time holds no jobs: what it left is said as the jobs are found
            log.info("The last run (%s) ended without finishing; carrying on from the ledger.",
                     dead)
        self.taken.append(dead)
        return True

    def _count_live(self) -> int:
        """Live workers, this one included (a SQLite ledger's is the only one: its file lock)."""
        return max(1, self.records.live()) if self.ledger.shared else 1

    def stop(self) -> None:
        """Hand this worker's jobs back (a clean end needs no lease to lapse)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.records.stop(self.name)
        except LedgerUnwritable:
            return  # the run's stop said why; the others take its jobs once its lease lapses
        except SQLAlchemyError as error:
            if self.ledger.gone() is None:  # a ledger gone is said by the run's stop
                log.warning("Could not hand this worker's jobs back (%s); the others take "
                            "them once its lease lapses.", error.__class__.__name__)


#: Booked moments lie a margin further apart than the ceiling's spacing: a request leaves its
#: worker a little after its moment (the database's answer, the event loop's timers, a busy
#: machine's scheduler), and the server counts any one second, so a request sent late shares
#: a second with the ones booked a full spacing after it. The margin starts at SLACK; each 429
#: widens it by SLACK_STEP (up to SLACK_MAX, a tenth of a second of lateness), and every
#: SLACK_CLEAN requests without one narrow it by half a step: it settles at what this machine's
#: lateness needs, as a rate discovered by AIMD settles at what the server takes.
SLACK = 0.02
SLACK_MAX = 0.10
SLACK_STEP = 0.01
SLACK_CLEAN = 100


class SharedPace:
    """Requests to the API host booked in the ledger, so that every worker together stays under
    one ``--max-qps``: each request takes the next free moment, 1/max_qps (plus this worker's
    margin) after the last one booked."""

    def __init__(self, ledger: Ledger, api_base: str, max_qps: float) -> None:
        self.records, self.api_base, self.max_qps = WorkerRecords(ledger), api_base, max_qps
        self.slack, self._clean = SLACK, 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pace")

    @property
    def interval(self) -> float:
        return (1.0 + self.slack) / self.max_qps

    def refused(self) -> None:
        """The server answered 429 to a booked request: it left too late for the margin."""
        self.slack, self._clean = min(SLACK_MAX, self.slack + SLACK_STEP), 0

    async def __call__(self) -> None:
        loop, delay = asyncio.get_running_loop(), 0.25
        while True:
            try:
                wait = await loop.run_in_executor(self._pool, self.records.next_api_slot,
                                                  self.api_base, self.interval)
                break
            except SQLAlchemyError:  # the database is away: a pause, not a failure
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
        self._clean += 1
        if self._clean >= SLACK_CLEAN:
            self.slack, self._clean = max(SLACK, self.slack - SLACK_STEP / 2), 0
        if wait > 0:
            await asyncio.sleep(wait)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
