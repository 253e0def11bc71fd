"""All reads and writes of the ledger's jobs, files and history, on SQLAlchemy Core (the rows
of the workers sharing it are :mod:`batch.ledger.workers`, through the same transactions).

:meth:`Ledger.transition` is the one way a job changes state: it checks the move against
:data:`batch.states.TRANSITIONS` (the database checks it again, see :mod:`batch.ledger.guards`),
compares and sets against the state the caller saw, and writes a history row. How durable a
write is, is decided in :meth:`Ledger._write` and nowhere else.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    Update,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError

from batch import crashpoints
from batch.ledger.guards import REFUSAL
from batch.ledger.models import events, files, folders, jobs, meta
from batch.states import (
    DISMISSABLE,
    IN_FLIGHT,
    NEEDS_ATTENTION,
    REDONE_IF_LOST,
    IllegalTransition,
    JobState,
    check_transition,
)

log = logging.getLogger("batch.ledger")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TransitionInfo:
    """What an attempt learned, recorded on the job and in its history row."""

    http_status: int | None = None
    error_code: str | None = None
    request_id: str | None = None
    log_id: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    content_sha256: str
    options_fp: str
    size_bytes: int
    state: JobState
    attempts: int
    charges: int
    task_id: str | None
    result_urls: list[str]
    submitted_at: float | None
    expires_at: float | None
    next_attempt_at: float
    result_sha256: str | None
    http_status: int | None
    error_code: str | None
    reason: str | None
    prepared: str | None


@dataclass(frozen=True, slots=True)
class FileRow:
    id: int
    root: str
    rel_path: str
    out_rel: str
    size_bytes: int
    mtime_ns: int
    content_sha256: str | None
    job_id: int | None
    written_rel: str | None
    written_sha256: str | None
    problem: str | None


class KnownFile(NamedTuple):
    size_bytes: int
    mtime_ns: int
    content_sha256: str | None
    job_id: int | None
    problem: str | None
    options_fp: str | None
    out_rel: str
    written_rel: str | None
    #: Its job's state (None without a job).
    job_state: str | None


class Superseded(NamedTuple):
    """A file whose photo (exported again over it) or options changed while the result for
    the ones before was paid for and not saved: that job is left with no file to save it at."""

    path: str
    #: The options changed, not the photo.
    options: bool


class Recorded(NamedTuple):
    """What :meth:`Ledger.record_files` did: new jobs waiting to be sent, and the files whose
    paid result is no longer wanted (see :class:`Superseded`)."""

    created: int
    superseded: list[Superseded]
    #: New jobs born done, with a result saved into another output folder (see :class:`Born`).
    copied: int = 0


class Born(NamedTuple):
    """How a new job starts when it is not to be sent: rejected (preflight's verdict, or a
    result saved elsewhere that is not to be had), or done with a result saved into another
    output folder, whose copies become its outputs. ``message`` is its reason and the first
    row of its history."""

    state: JobState
    message: str
    error_code: str | None = None
    result_sha256: str | None = None


class ScannedFile(NamedTuple):
    """A file as a scan found it: what :meth:`Ledger.record_files` records. A file that
    cannot be processed has no ``content_sha256`` and says why in ``problem``."""

    root: str
    rel_path: str
    out_rel: str
    size_bytes: int
    mtime_ns: int
    content_sha256: str | None
    options_fp: str
    problem: str | None = None
    #: How a new job for the content starts, when it is not to be sent (see :class:`Born`).
    born: Born | None = None
    #: The job the ledger's row for this file linked before it was read again (its photo or
    #: options may have changed since): see :class:`Superseded`.
    linked: int | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    state: str
    reason: str
    error_code: str | None
    http_status: int | None


JOB_COLUMNS = [jobs.c[name] for name in JobRow.__slots__]
FILE_COLUMNS = [files.c[name] for name in FileRow.__slots__]
#: Columns a transition may set besides the state (never ``state``, ``id`` or the identity).
TRANSITION_FIELDS = frozenset({"task_id", "result_urls", "submitted_at", "expires_at",
                               "attempts", "next_attempt_at", "reason", "error_code",
                               "prepared", "stripped", "result_sha256", "dismissed_at"})
#: The job is still wanted by some file (a correlated EXISTS: one index probe per job).
WANTED = exists().where(files.c.job_id == jobs.c.id)
#: A file outside the sources that are away (a drive not plugged in) wants the job.
WANTED_HERE = exists().where(files.c.job_id == jobs.c.id,
                             files.c.root.not_in(bindparam("away", expanding=True)))
#: A job left waiting by a run's stop says so (see :meth:`Ledger.annotate_waiting`).
WAITING_REASON = jobs.c.reason.like("not sent:%")
#: Paid for (or being paid for), not saved, and no file wants it any more: its photo or its
#: options changed after it was sent (see :meth:`Ledger._note_superseded`).
SUPERSEDED = and_(jobs.c.state.in_([s.value for s in IN_FLIGHT]), ~WANTED)
#: A file row the ledger may forget when its file is gone: none whose job is paid for and not
#: saved yet, as that result is still saved (see :meth:`Ledger.forget_files`).
FORGETTABLE = or_(files.c.job_id.is_(None), files.c.job_id.not_in(
    select(jobs.c.id).where(jobs.c.state.in_([s.value for s in IN_FLIGHT]))))
#: What became of such results, as the scan, ``status`` and the report say it.
NOT_SAVED = ("not saved, as their photos or options changed after they were sent (each job's "
             "history in the ledger says which)")
#: The meta key set in a ledger whose results come from the bundled emulator (imitations).
EMULATED = "bundled_emulator"
#: The meta keys of the runs' record: how many started, the latest start (and as which
#: worker), the last run that ended (written by ``batch.pipeline``, read by the report).
RUNS, RUN_STARTED, LAST_RUN = "runs", "run_started", "last_run"
#: The folders each root's last scan could not list (see ``Ledger.note_unreadable``).
UNREADABLE = "unreadable_folders"
#: The roots whose last scan a stop cut short (see ``Ledger.note_scan_cut``).
CUT_SHORT = "scans_cut_short"
#: What each root's last scan said of the photos it held back for a change of options.
HELD = "photos_held"
#: "file" where photos are identified by their files' whole bytes (see ``Ledger.image_identity``).
IDENTITY = "identity"
#: Rows per statement when a scan records files (SQLite binds at most 32,766 parameters).
RECORD_CHUNK = 1000
#: A PostgreSQL ledger analyzes its tables once a scan has recorded this many files, and again
#: each time it has recorded as many more as it had then (see :meth:`Ledger.record_files`).
ANALYZE_AFTER = 100


# The statements the stages run for every image, built once: building one costs more CPU than
# running it. Their SQL is compiled once too (SQLAlchemy's statement cache).
_STATE_OF = select(jobs.c.state).where(jobs.c.id == bindparam("job_id"))
_JOB = select(*JOB_COLUMNS).where(jobs.c.id == bindparam("job_id"))
_FILES_OF_JOBS = select(*FILE_COLUMNS).where(
    files.c.job_id.in_(bindparam("job_ids", expanding=True))).order_by(files.c.id)
_EVENT = events.insert()
_SET_OUTPUT = update(files).where(files.c.id == bindparam("file_id")).values(
    written_rel=bindparam("v_written_rel"), written_sha256=bindparam("v_written_sha256"),
    problem=bindparam("v_problem"))


@functools.cache
def _move_statement(columns: tuple[str, ...], charge: bool) -> Update:
    """The compare-and-set update of a move that sets ``columns`` (bound as ``v_<name>``)."""
    values: dict[str, Any] = {c: bindparam(f"v_{c}") for c in columns}
    if charge:
        values["charges"] = jobs.c.charges + 1
    return update(jobs).where(jobs.c.id == bindparam("job_id"),
                              jobs.c.state == bindparam("expected")).values(values)


def _claim_order(soonest_expiry_first: bool) -> tuple[Any, ...]:
    return ((func.coalesce(jobs.c.expires_at, 0), jobs.c.id) if soonest_expiry_first
            else (jobs.c.next_attempt_at, jobs.c.id))


#: An expired job whose result was saved once (its outputs since moved or deleted) is bought
#: again only when a person asks (``retry --expired``), never by the resubmit policy.
NOT_DELIVERED = or_(jobs.c.state != JobState.EXPIRED.value, jobs.c.result_sha256.is_(None))


@functools.cache
def _claim_statement(states: frozenset[JobState], soonest_expiry_first: bool,
                     away: bool = False) -> Select[Any]:
    return (select(*JOB_COLUMNS)
            .where(jobs.c.state.in_(sorted(s.value for s in states)),
                   jobs.c.next_attempt_at <= bindparam("now"), WANTED_HERE if away else WANTED,
                   NOT_DELIVERED)
            .order_by(*_claim_order(soonest_expiry_first)).limit(bindparam("limit")))


@functools.cache
def _owned_claim_statement(states: frozenset[JobState], soonest_expiry_first: bool) -> Update:
    """Take jobs nobody holds (or this worker already holds) whose files lie under the worker's
    roots: row locks held by another worker's claim are skipped, not waited for, so two
    workers never take the same job and never queue behind each other."""
    chosen = (select(jobs.c.id)
              .where(jobs.c.state.in_(sorted(s.value for s in states)),
                     jobs.c.next_attempt_at <= bindparam("now"), REACHABLE, NOT_DELIVERED,
                     or_(jobs.c.owner.is_(None), jobs.c.owner == bindparam("me")))
              .order_by(*_claim_order(soonest_expiry_first)).limit(bindparam("limit"))
              .with_for_update(skip_locked=True, of=jobs))
    return (update(jobs).where(jobs.c.id.in_(chosen)).values(owner=bindparam("me"))
            .returning(*JOB_COLUMNS))


#: The job has a file under one of the worker's roots.
REACHABLE = exists().where(files.c.job_id == jobs.c.id,
                           files.c.root.in_(bindparam("roots", expanding=True)))


_other = jobs.alias("other")
#: The same photo has a result under other options: this job pays to retouch it again.
REDONE = exists().where(_other.c.content_sha256 == jobs.c.content_sha256,
                        _other.c.options_fp != jobs.c.options_fp,
                        _other.c.state == JobState.DONE.value)


@functools.cache
def _count_statement(states: frozenset[JobState], by_root: bool = False,
                     redone: bool = False, away: bool = False,
                     sent_since: bool = False) -> Select[Any]:
    in_states = jobs.c.state.in_(sorted(s.value for s in states))
    return select(func.count()).select_from(jobs).where(
        or_(in_states, jobs.c.submitted_at >= bindparam("since")) if sent_since else in_states,
        REACHABLE if by_root else WANTED_HERE if away else WANTED,
        NOT_DELIVERED, *([REDONE] if redone else []))


def fetchable(state: str | None, result_urls: str | None, expires_at: float | None,
              now: float) -> bool:
    """A failed job whose result is paid for and whose link lives (see
    :meth:`Ledger.reset_jobs`), from its row."""
    return (state == JobState.FAILED.value and result_urls is not None
            and expires_at is not None and expires_at > now)


def fetch_again_words(expires_at: float) -> str:
    return (f"paid for: skinbatch retry --failed downloads it again, not paying again, until "
            f"its link expires, {datetime.fromtimestamp(expires_at):%Y-%m-%d %H:%M}")


def _of_files_at(paths: Sequence[str]) -> ColumnElement[bool]:
    """Jobs of the files at ``paths`` (as the ledger names them: absolute, or under a root's
    name), or in the folders there (``smith`` is not ``smithson``)."""
    full = files.c.root + "/" + files.c.rel_path
    return jobs.c.id.in_(select(files.c.job_id).where(or_(
        *[or_(full == p, func.substr(full, 1, len(p) + 1) == p + "/") for p in paths])))


def _job(row: Any) -> JobRow:
    values = dict(row._mapping)
    values["state"] = JobState(values["state"])
    values["result_urls"] = json.loads(values["result_urls"]) if values["result_urls"] else []
    return JobRow(**values)


def _file(row: Any) -> FileRow:
    return FileRow(**row._mapping)


@dataclass(frozen=True, slots=True)
class Write:
    """One ledger write, ready for :meth:`Ledger.commit`: ``run`` makes it inside a
    transaction it may share with other writes; ``durable`` says whether it must be on disk
    before its caller goes on; ``point`` is the crash-test point reached once it is committed."""

    run: Callable[[Connection], None]
    durable: bool = True
    point: str | None = None


class Requeued(NamedTuple):
    moved: int
    """Jobs put back in line."""
    fetched: int
    """Of them, failed jobs whose paid result is downloaded again rather than paid again."""


class StaleTransition(RuntimeError):
    """The job was no longer in the expected state (another worker or process moved it)."""


class LedgerUnwritable(RuntimeError):
    """The ledger's database cannot take a write: the disk (or quota) under it is full, or
    the disk failed the write (a failing drive, one the system made read-only after errors).
    Nothing more can be recorded, so nothing more may be paid for."""

    def __init__(self, why: str = "the disk under it is full",
                 remedy: str = "free some space") -> None:
        super().__init__(f"The ledger cannot be written: {why}. Nothing more is sent; "
                         f"{remedy}, then run the same command again (what was paid for is "
                         "picked up where it stopped).")


def unreadable_reason(why: str) -> str:
    """Why a folder's photos are not sent: it cannot be listed (not this user's, a share
    failing)."""
    return f"cannot be read ({why}); its photos are left out until it can be"


class LedgerGone(RuntimeError):
    """A SQLite ledger's file is missing from its path (its drive unplugged, its share
    unmounted). It holds what was paid for, so the run stops rather than record elsewhere;
    the same command, once the file is back, carries on from it."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"The ledger {path} is gone (its drive unplugged or its share "
                         "unmounted?). What was paid for is recorded in it")


def _unwritable(error: BaseException) -> LedgerUnwritable | None:
    """The write's failure as a stop with its cause: SQLite's SQLITE_FULL or PostgreSQL's
    disk_full (SQLSTATE 53100); SQLite's I/O error or read-only database (a failing drive,
    one the system made read-only after errors, a file made read-only). None otherwise."""
    orig = getattr(error, "orig", None)
    code = getattr(orig, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL or getattr(orig, "sqlstate", None) == "53100":
        return LedgerUnwritable()
    if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY):
        return LedgerUnwritable(
            f"the disk under it failed the write ({orig}: the drive may be failing, or the "
            "system made it read-only after errors)",
            "check the drive (dmesg says what the system saw) until it takes writes again")
    return None


def _refused(exc: DBAPIError, job_id: int, current: str, target: str) -> Exception:
    """The database's trigger refusing a move, as the error Python's check raises."""
    return IllegalTransition(job_id, current, target) if REFUSAL in str(exc.orig) else exc


def _upsert_for(dialect: str) -> Any:
    """The back-end's INSERT with ON CONFLICT. Imported here, for the back-end in use only:
    PostgreSQL's dialect module is among the heaviest imports of a run, and a SQLite ledger
    never needs it."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql
        return postgresql.insert
    from sqlalchemy.dialects import sqlite
    return sqlite.insert


class Ledger:
    """The job ledger. Safe to share between threads; every method is one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = _upsert_for(engine.dialect.name)
        self._local = threading.local()
        #: The worker this ledger object writes for (recorded on every history row it writes).
        self.worker: str | None = None
        #: How long (seconds) a write waits for a shared ledger's database that went away
        #: (restarted, network gone) before it fails; its worker's lease, once it has one.
        self.patience = 0.0
        #: An outage of the shared database is said once (see :meth:`said_away`).
        self._outage_lock, self._outage_said = threading.Lock(), False
        #: Files recorded by this process: in all, and when the tables were last analyzed.
        self._recorded, self._analyzed_at = 0, 0

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Within the block, this thread's transactions share one connection. The stages make
        several short transactions per image, and checking a connection out of the pool and
        back in for each costs as much CPU as their statements. SQLite only: a PostgreSQL
        connection comes from the pool each time, whose pre-ping replaces one the server
        dropped."""
        if self.engine.dialect.name != "sqlite" or getattr(self._local, "conn", None):
            yield
            return
        self._local.conn = self.engine.connect()
        try:
            yield
        finally:
            self._local.conn.close()
            self._local.conn = None

    @property
    def file(self) -> Path | None:
        """The SQLite ledger's file (None for a database server's)."""
        path = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not path or path == ":memory:":
            return None
        return Path(path)

    def gone(self) -> LedgerGone | None:
        """Why a SQLite ledger's file is missing from its path, or None. Asked of the path,
        not of a connection: open connections may go on answering (a lazily unmounted share)
        or fail with an I/O error (a drive unplugged), and in both cases nothing recorded
        through them would be found by the next run."""
        path = self.file
        if path is None or os.path.exists(path):
            return None
        return LedgerGone(str(path))

    def said_away(self, error: BaseException) -> None:
        """Say once an outage that the shared ledger's database cannot be reached (whichever
        thread meets it first); :meth:`said_back` says when it ends."""
        with self._outage_lock:
            if self._outage_said:
                return
            self._outage_said = True
        log.warning("The ledger database cannot be reached (%s); waiting for it.",
                    type(getattr(error, "orig", None) or error).__name__)

    def said_back(self) -> None:
        """The database answered (the heartbeat's next beat): the end of an outage said."""
        with self._outage_lock:
            if not self._outage_said:
                return
            self._outage_said = False
        log.warning("The ledger database answers again.")

    def away(self, error: BaseException) -> bool:
        """The error says the shared ledger's database cannot be reached (not that a
        statement was wrong): worth waiting for."""
        return self.shared and isinstance(error, DBAPIError) and (
            error.connection_invalidated or isinstance(error, OperationalError))

    def patiently(self, attempt: Callable[[], T]) -> T:
        """Run one whole transaction, again while the database is away (a failed transaction
        left nothing behind), for up to :attr:`patience` seconds. A transaction whose COMMIT
        the server made before the connection dropped is tried again all the same: its moves,
        found made, pass (see :meth:`_move`)."""
        deadline, delay = time.monotonic() + self.patience, 0.25
        again = getattr(self._local, "again", False)
        try:
            while True:
                try:
                    return attempt()
                except DBAPIError as error:
                    if not self.away(error) or time.monotonic() + delay > deadline:
                        raise
                    self.said_away(error)
                    time.sleep(delay)
                    delay = min(2 * delay, 5.0)
                    self._local.again = True
        finally:
            self._local.again = again

    @contextmanager
    def _transaction(self, *, readonly: bool, durable: bool) -> Iterator[Connection]:
        """The engine's begin hook reads both options (see ``batch.ledger.engine``)."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self.engine.execution_options(readonly=readonly, durable=durable).begin() as c:
                yield c
            return
        conn.execution_options(readonly=readonly, durable=durable)
        with conn.begin():
            yield conn

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write transaction. ``durable``: on disk before it returns. A write whose loss
        costs nothing (scan records the next scan makes again, moves the next run redoes for
        free) skips the flush; the next durable commit makes it durable too (SQLite's WAL and
        PostgreSQL's log keep commits in order). The engine's begin hook applies it."""
        try:
            with self._transaction(readonly=False, durable=durable) as conn:
                yield conn
        except DBAPIError as error:
            # A file gone with its drive fails with an I/O error too: that stop is LedgerGone's.
            if (unwritable := _unwritable(error)) is not None and self.gone() is None:
                raise unwritable from error
            raise

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction: in WAL mode it waits for no writer."""
        with self._transaction(readonly=True, durable=True) as conn:
            yield conn

    # ---- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._read() as conn:
            return conn.scalar(select(meta.c.value).where(meta.c.key == key))

    @functools.cached_property
    def image_identity(self) -> bool:
        """Photos are identified by their image, not their files' whole bytes (see
        :func:`batch.preflight.identity_digest`): every ledger but one that had jobs before
        this was so (migration 0007 marks those)."""
        return self.get_meta(IDENTITY) != "file"

    def emulated(self) -> bool:
        """Its results come from the bundled emulator, not the API (see
        ``batch.pipeline.check_results_source``)."""
        return self.get_meta(EMULATED) == "1"

    def mark_emulated(self) -> None:
        self.set_meta(EMULATED, "1")

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            self._set_meta(conn, key, value)

    def told_before(self, key: str, items: Collection[str]) -> set[str]:
        """Which of ``items`` were told before under ``key``, recording all of them as told:
        a warning is said the first time, then a line of the log, so a nightly cron job (which
        mails every warning) is quiet again after one night."""
        if not items:
            return set()
        with self._write() as conn:
            told = set(json.loads(conn.scalar(select(meta.c.value).where(meta.c.key == key))
                                  or "[]"))
            if new := set(items) - told:
                self._set_meta(conn, key, json.dumps(sorted(told | new)))
        return told & set(items)

    def _set_meta(self, conn: Connection, key: str, value: str) -> None:
        statement = self._insert(meta).values(key=key, value=value)
        conn.execute(statement.on_conflict_do_update(
            index_elements=["key"], set_={"value": statement.excluded.value}))

    # ---- scanning -----------------------------------------------------------------------

    def note_unreadable(self, root: str, folders: list[tuple[str, str]]) -> None:
        """The folders under ``root`` (relative, with why) its last whole scan could not list:
        problems until a scan lists them (see :meth:`problems`)."""
        self._note_root(UNREADABLE, root, [list(entry) for entry in folders])

    def note_scan_cut(self, root: str, cut: bool) -> None:
        """Whether the last scan of ``root`` was cut short by a stop (Ctrl-C, the deadline):
        until one ends, the photos it did not look at are in no count, so the morning's
        ``status`` and report say so (see :meth:`problems`)."""
        self._note_root(CUT_SHORT, root, cut)

    def note_held(self, root: str, words: str | None) -> None:
        """What the last whole scan of ``root`` said of the photos it held back for a change
        of options (see ``batch.scan``), or None: a problem until none is (see
        :meth:`problems`)."""
        self._note_root(HELD, root, words)

    def _note_root(self, key: str, root: str, value: Any) -> None:
        """What the meta record ``key`` (one entry per root) says of ``root``; a false
        ``value`` takes the root out. Written only when changed, as a watch scans every few
        seconds; the row locked, as another worker may note its own roots meanwhile."""
        if json.loads(self.get_meta(key) or "{}").get(root) == (value or None):
            return
        with self._write() as conn:
            known = json.loads(conn.scalar(select(meta.c.value).where(
                meta.c.key == key).with_for_update()) or "{}")
            known.pop(root, None)
            if value:
                known[root] = value
            self._set_meta(conn, key, json.dumps(known, ensure_ascii=False))

    def has_files(self, root: str) -> bool:
        with self._read() as conn:
            return conn.scalar(select(files.c.id).where(files.c.root == root).limit(1)) is not None

    def known_files(self, root: str, rel_dir: str) -> dict[str, KnownFile]:
        """The files the ledger knows directly in one folder (``rel_dir``, "" for the root),
        with their jobs' options: what a re-scan of a changed folder compares against."""
        query = (
            select(files.c.rel_path, files.c.size_bytes, files.c.mtime_ns,
                   files.c.content_sha256, files.c.job_id, files.c.problem, jobs.c.options_fp,
                   files.c.out_rel, files.c.written_rel, jobs.c.state)
            .select_from(files.outerjoin(jobs, jobs.c.id == files.c.job_id))
            .where(files.c.root == root)
        )
        query = query.where(self._under(rel_dir) if rel_dir else
                            files.c.rel_path.not_like("%/%"))
        depth = len(rel_dir) + 1 if rel_dir else 0
        with self._read() as conn:
            return {row[0]: KnownFile._make(row[1:]) for row in conn.execute(query)
                    if "/" not in row[0][depth:]}

    def _under(self, rel_dir: str) -> ColumnElement[bool]:
        """Files at any depth under the folder ``rel_dir`` of a root."""
        if self.engine.dialect.name == "sqlite":
            # A range in binary order: the (root, rel_path) index answers it, and unlike
            # SQLite's LIKE it tells "A/" from "a/".
            return and_(files.c.rel_path > rel_dir + "/", files.c.rel_path < rel_dir + "0")
        return files.c.rel_path.startswith(rel_dir + "/", autoescape=True)

    def folder_digests(self, root: str) -> dict[str, tuple[str, int]]:
        """Each folder's digest and image count, as the last complete scan left them."""
        query = select(folders.c.rel_dir, folders.c.digest, folders.c.images).where(
            folders.c.root == root)
        with self._read() as conn:
            return {d: (digest, n) for d, digest, n in conn.execute(query)}

    def save_folder_digests(self, root: str, clean: dict[str, tuple[str, int]],
                            dirty: Iterable[str]) -> None:
        """Record the folders found fully recorded (``clean``: digest and image count), and
        forget the digests of the ones that were not, so they are looked at file by file.
        Not durable: should a power cut undo it, the next scan looks at those folders file
        by file."""
        dirty = list(dirty)
        with self._write(durable=False) as conn:
            if clean:
                statement = self._insert(folders)
                conn.execute(statement.on_conflict_do_update(
                    index_elements=["root", "rel_dir"],
                    set_={c: statement.excluded[c] for c in ("digest", "images")}),
                    [{"root": root, "rel_dir": d, "digest": digest, "images": n}
                     for d, (digest, n) in clean.items()])
            for start in range(0, len(dirty), RECORD_CHUNK):
                conn.execute(folders.delete().where(
                    folders.c.root == root,
                    folders.c.rel_dir.in_(dirty[start:start + RECORD_CHUNK])))

    def record_files(self, found: Sequence[ScannedFile]) -> Recorded:
        """Record scanned files (insert or update by root and relative path) and link each
        readable one to its job (content + options), creating jobs in the order their first
        file came. A job whose content preflight refused starts rejected and is not counted
        as created. One transaction, not durable: a scan lost to a power cut is made again by
        the next scan, and no upload starts from a job before a durable write
        (``submitting``) has made it durable."""
        def record() -> Recorded:
            born, superseded = Counter[JobState](), list[Superseded]()
            with self._write(durable=False) as conn:
                for start in range(0, len(found), RECORD_CHUNK):
                    chunk = found[start:start + RECORD_CHUNK]
                    born += self._record_chunk(conn, chunk)
                    superseded += self._note_superseded(conn, chunk)
            return Recorded(born[JobState.PENDING], superseded, born[JobState.DONE])

        recorded = self.patiently(record)
        self._recorded += len(found)
        if self.shared and self._recorded - self._analyzed_at >= max(ANALYZE_AFTER,
                                                                     self._analyzed_at):
            self.patiently(self._analyze)
            self._analyzed_at = self._recorded
        return recorded

    def _note_superseded(self, conn: Connection,
                         found: Sequence[ScannedFile]) -> list[Superseded]:
        """Of the jobs ``found`` files linked before (see :attr:`ScannedFile.linked`), those
        paid for (or being paid for), not saved yet, and now with no file: the photo changed
        (exported again over itself), or its options did. Its history says so; it keeps
        waiting for its photo and options to come back (then its result is saved, not paid
        again)."""
        before = {f.linked for f in found if f.linked is not None}
        if not before:
            return []
        orphaned = {job_id: sha for job_id, sha in conn.execute(select(
            jobs.c.id, jobs.c.content_sha256).where(jobs.c.id.in_(before), SUPERSEDED))}
        now = time.time()
        superseded = []
        for f in found:
            if (job_id := f.linked) is None or job_id not in orphaned or not f.content_sha256:
                continue  # (a file that could not be read is no change of photo)
            gone = Superseded(f"{f.root.rstrip('/')}/{f.rel_path}",
                              options=orphaned[job_id] == f.content_sha256)
            state = self._state_of(conn, job_id).value
            self._event(conn, job_id, state, state, 0, TransitionInfo(
                message=f"{gone.path}: its {'options' if gone.options else 'photo'} changed "
                        "after this was sent; its result is not saved unless they come back"),
                now)
            superseded.append(gone)
        return superseded

    def forget_files(self, root: str, rel_paths: Sequence[str]) -> None:
        """Files gone from a folder that is still there (culled, renamed, moved away): the
        ledger forgets them, so their jobs are neither sent nor listed as needing a person.
        Not those whose job is paid for and not saved yet: that result is still saved. A job
        left without files waits for one to come back (a restored photo is not paid again)."""
        with self._write(durable=False) as conn:
            for start in range(0, len(rel_paths), RECORD_CHUNK):
                chunk = rel_paths[start:start + RECORD_CHUNK]
                conn.execute(files.delete().where(
                    files.c.root == root, files.c.rel_path.in_(chunk), FORGETTABLE))

    def roots_moved_to(self, roots: Sequence[str]) -> list[str]:
        """The roots recorded besides ``roots`` with a photo whose job a file under one of
        ``roots`` shares: the same photos, found under another folder's name."""
        other = files.alias("other")
        with self._read() as conn:
            recorded = conn.scalars(select(files.c.root).distinct()).all()
            return [root for root in recorded if root not in roots and conn.scalar(
                select(other.c.id).join(files, files.c.job_id == other.c.job_id)
                .where(other.c.root == root, files.c.root.in_(roots)).limit(1)) is not None]

    def forget_root(self, root: str) -> None:
        """A source folder gone for good (renamed, moved): its files, as :meth:`forget_files`
        forgets them, and what its scans noted."""
        with self._write(durable=False) as conn:
            conn.execute(files.delete().where(files.c.root == root, FORGETTABLE))
            conn.execute(folders.delete().where(folders.c.root == root))
        for key in (UNREADABLE, CUT_SHORT, HELD):
            self._note_root(key, root, None)

    def forget_files_write(self, file_ids: Collection[int]) -> Write:
        """Files found gone when their photo's turn came (culled or moved away since the
        scan), forgotten as :meth:`forget_files` forgets them."""
        def run(conn: Connection) -> None:
            conn.execute(files.delete().where(files.c.id.in_(list(file_ids)), FORGETTABLE))

        return Write(run, durable=False)

    def forget_folder(self, root: str, rel_dir: str) -> None:
        """Every file under a folder gone from the source (deleted, moved away, renamed),
        as :meth:`forget_files` forgets one."""
        with self._write(durable=False) as conn:
            conn.execute(files.delete().where(files.c.root == root, self._under(rel_dir),
                                              FORGETTABLE))

    def _analyze(self) -> None:
        """PostgreSQL plans by the row counts ANALYZE last saw, and autovacuum runs it about
        once a minute: a claim planned for the empty tables of a first scan, over thousands of
        rows since, looks through every file for every job, and a worker claims once per
        upload. Analyzing as the scan doubles the tables keeps plans right."""
        with self._write(durable=False) as conn:
            conn.exec_driver_sql("ANALYZE jobs, files")

    def _record_chunk(self, conn: Connection, found: Sequence[ScannedFile]
                      ) -> Counter[JobState]:
        """Record a chunk of files; returns the new jobs by the state they start in."""
        now = time.time()
        wanted: dict[tuple[str, str], ScannedFile] = {}
        for f in found:
            if f.content_sha256 is not None:
                wanted.setdefault((f.content_sha256, f.options_fp), f)
        ids = self._job_ids(conn, list(wanted))
        starts = Counter[JobState]()
        pending = Born(JobState.PENDING, "")
        missing = [{"content_sha256": sha, "options_fp": fp, "size_bytes": f.size_bytes,
                    "state": born.state.value, "reason": born.message or None,
                    "error_code": born.error_code, "result_sha256": born.result_sha256,
                    "created_at": now, "updated_at": now,
                    "next_attempt_at": 0.0, "attempts": 0, "charges": 0}
                   for (sha, fp), f in wanted.items() if (sha, fp) not in ids
                   for born in [f.born or pending]]
        if missing:
            inserted = conn.execute(self._insert(jobs).on_conflict_do_nothing().returning(
                jobs.c.content_sha256, jobs.c.options_fp, jobs.c.id), missing).all()
            ids.update({(sha, fp): id_ for sha, fp, id_ in inserted})
            for sha, fp, id_ in inserted:  # a job not born pending says why in its history
                born = wanted[(sha, fp)].born or pending
                starts[born.state] += 1
                if born is not pending:
                    self._event(conn, id_, None, born.state.value, 0,
                                TransitionInfo(message=born.message), now)
            if len(ids) < len(wanted):  # made meanwhile by another writer
                ids.update(self._job_ids(conn, [key for key in wanted if key not in ids]))
        statement = self._insert(files)
        columns = ("out_rel", "size_bytes", "mtime_ns", "content_sha256", "job_id", "problem",
                   "seen_at")
        conn.execute(statement.on_conflict_do_update(
            index_elements=["root", "rel_path"],
            set_={c: statement.excluded[c] for c in columns}),
            [{"root": f.root, "rel_path": f.rel_path, "out_rel": f.out_rel,
              "size_bytes": f.size_bytes, "mtime_ns": f.mtime_ns,
              "content_sha256": f.content_sha256, "problem": f.problem, "seen_at": now,
              "job_id": (None if f.content_sha256 is None
                         else ids[(f.content_sha256, f.options_fp)])}
             for f in found])
        return starts

    @staticmethod
    def _job_ids(conn: Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        if not keys:
            return {}
        query = select(jobs.c.content_sha256, jobs.c.options_fp, jobs.c.id).where(
            tuple_(jobs.c.content_sha256, jobs.c.options_fp).in_(keys))
        return {(sha, fp): id_ for sha, fp, id_ in conn.execute(query)}

    def options_in_use(self) -> dict[str, int]:
        """Files per effective options (after per-folder presets)."""
        query = (select(jobs.c.options_fp, func.count()).select_from(
            files.join(jobs, jobs.c.id == files.c.job_id)).group_by(jobs.c.options_fp))
        with self._read() as conn:
            return {fp: n for fp, n in conn.execute(query)}

    # ---- the state machine ----------------------------------------------------------------

    def commit(self, writes: Sequence[Write]) -> list[Exception | None]:
        """Make ``writes`` in one transaction, flushed to disk if any is durable. Several
        writes share it each in its own savepoint: one that fails is rolled back alone and its
        error returned in its place (``None`` for the others). A single write's error is
        raised. An error of the transaction itself (the disk is full) is raised for all."""
        outcomes = self.patiently(lambda: self._commit(writes))
        for write, outcome in zip(writes, outcomes, strict=True):
            if outcome is None and write.point is not None:
                crashpoints.reached(write.point)
        return outcomes

    def _commit(self, writes: Sequence[Write]) -> list[Exception | None]:
        outcomes: list[Exception | None] = [None] * len(writes)
        with self._write(durable=any(w.durable for w in writes)) as conn:
            if len(writes) == 1:
                writes[0].run(conn)
            else:
                for index, write in enumerate(writes):
                    savepoint = conn.begin_nested()
                    try:
                        write.run(conn)
                    except Exception as exc:
                        if self.away(exc) or _unwritable(exc) is not None:
                            raise  # the whole transaction again, or none of it
                        savepoint.rollback()
                        outcomes[index] = exc
                    else:
                        savepoint.commit()
        return outcomes

    def transition(self, job_id: int, target: JobState, *, expect: JobState | None = None,
                   info: TransitionInfo | None = None, charge: bool = False,
                   **fields: Any) -> None:
        """Move one job to ``target`` now (see :meth:`transition_write`)."""
        self.commit([self.transition_write(job_id, target, expect=expect, info=info,
                                           charge=charge, **fields)])

    def transition_write(self, job_id: int, target: JobState, *,
                         expect: JobState | None = None, info: TransitionInfo | None = None,
                         charge: bool = False, **fields: Any) -> Write:
        """Move one job to ``target``: checked against the legal transitions, compare-and-set
        against the ``expect``-ed state (or the one it is in), with a history row.
        ``charge`` counts one more upload that may have cost credits; ``fields`` set other
        columns (only :data:`TRANSITION_FIELDS`). A move whose loss the next run redoes for
        free (``REDONE_IF_LOST``) does not wait for the disk."""
        unknown = set(fields) - TRANSITION_FIELDS
        if unknown:
            raise TypeError(f"a transition cannot set {sorted(unknown)}")

        def run(conn: Connection) -> None:
            self._move(conn, job_id, expect, target, info, fields, charge=charge)

        return Write(run, durable=target not in REDONE_IF_LOST, point=target.value)

    def _move(self, conn: Connection, job_id: int, expect: JobState | None, target: JobState,
              info: TransitionInfo | None, fields: dict[str, Any], *,
              charge: bool = False) -> None:
        """The one place a job's state changes."""
        current = expect if expect is not None else self._state_of(conn, job_id)
        check_transition(job_id, current, target)
        now = time.time()
        values: dict[str, Any] = {"state": target.value, "updated_at": now}
        if info is not None:
            values.update(http_status=info.http_status, error_code=info.error_code,
                          request_id=info.request_id, log_id=info.log_id)
            if info.message is not None:
                values["reason"] = info.message
        values.update(fields)
        if isinstance(values.get("result_urls"), list):
            values["result_urls"] = json.dumps(values["result_urls"])
        statement = _move_statement(tuple(sorted(values)), charge)
        params = {f"v_{c}": v for c, v in values.items()}
        try:
            changed = conn.execute(statement, {**params, "job_id": job_id,
                                               "expected": current.value}).rowcount
        except DBAPIError as exc:
            raise _refused(exc, job_id, current.value, target.value) from exc
        if changed != 1:
            actual = conn.scalar(_STATE_OF, {"job_id": job_id})
            if actual == target.value and getattr(self._local, "again", False):
                return  # this move, committed before its answer was lost (see patiently)
            raise StaleTransition(f"job {job_id} is {actual}, expected {current.value}")
        self._event(conn, job_id, current.value, target.value, fields.get("attempts", 0),
                    info, now)

    @staticmethod
    def _state_of(conn: Connection, job_id: int) -> JobState:
        state = conn.scalar(_STATE_OF, {"job_id": job_id})
        if state is None:
            raise KeyError(f"no job {job_id}")
        return JobState(state)

    def _event(self, conn: Connection, job_id: int, from_state: str | None, to_state: str,
               attempt: int, info: TransitionInfo | None, now: float) -> None:
        info = info or TransitionInfo()
        conn.execute(_EVENT, {
            "job_id": job_id, "at": now, "from_state": from_state, "to_state": to_state,
            "attempt": attempt, "http_status": info.http_status, "error_code": info.error_code,
            "request_id": info.request_id, "log_id": info.log_id, "message": info.message,
            "worker": self.worker})

    def note_attempt_write(self, job_id: int, info: TransitionInfo, *, attempts: int,
                           next_attempt_at: float) -> Write:
        """A failed attempt that leaves the state as it is (e.g. a poll that hit a 5xx)."""

        def run(conn: Connection) -> None:
            now = time.time()
            state = self._state_of(conn, job_id)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                attempts=attempts, next_attempt_at=next_attempt_at, updated_at=now,
                http_status=info.http_status, error_code=info.error_code))
            self._event(conn, job_id, state.value, state.value, attempts, info, now)

        return Write(run)

    def recover_interrupted(self, owner: str | None = None, taker: str | None = None,
                            why: str = "the run stopped") -> dict[str, int]:
        """Work a dead run left half-done becomes explicit again: its ``submitting`` rows are
        uploads whose answer was never recorded and become ``ambiguous`` (maybe charged), its
        ``downloading`` rows go back to ``ready``. ``owner``: the dead worker whose jobs these
        are (None: jobs nobody holds, as on a SQLite ledger, which one run has at a time)."""
        with self._write() as conn:
            return self._recover(conn, owner, why)

    def _recover(self, conn: Connection, owner: str | None, why: str) -> dict[str, int]:
        held = jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner
        moves = {
            JobState.SUBMITTING: (JobState.AMBIGUOUS, TransitionInfo(
                error_code="AMBIGUOUS_SUBMIT",
                message=f"{why} after the upload began and before its answer was recorded: "
                        "it may have been charged")),
            JobState.DOWNLOADING: (JobState.READY, TransitionInfo(
                message=f"{why} while downloading; the download will be redone")),
        }
        counts: dict[str, int] = {}
        for source, (target, info) in moves.items():
            ids = conn.scalars(select(jobs.c.id).where(jobs.c.state == source.value,
                                                       held)).all()
            for job_id in ids:
                self._move(conn, job_id, source, target, info, {},
                           charge=target is JobState.AMBIGUOUS)
            counts[target.value] = len(ids)
        return counts

    def finish_download_write(self, job_id: int, result_sha256: str,
                              outputs: dict[int, tuple[str, str | None]],
                              problems: dict[int, str]) -> Write:
        """Every output written for a job recorded and the job marked done, atomically."""

        def run(conn: Connection) -> None:
            for file_id, (rel, sha) in outputs.items():
                self._set_output(conn, file_id, rel, sha, None)
            for file_id, problem in problems.items():
                conn.execute(update(files).where(files.c.id == file_id).values(problem=problem))
            self._move(conn, job_id, JobState.DOWNLOADING, JobState.DONE, None,
                       {"result_sha256": result_sha256, "attempts": 0})

        return Write(run, point=JobState.DONE.value)

    def reset_jobs(self, states: Iterable[JobState], message: str, paths: Sequence[str] = (),
                   error_code: str | None = None) -> Requeued:
        """Put jobs in ``states`` back in line (the ``retry`` command; at a run's start, the
        jobs that ended with ``error_code``, those a person dismissed left as they are): to be
        sent, or, a failed one whose result is paid for and whose link lives (its download
        failed: a result over the cap, a host that kept failing it), to be downloaded again
        for nothing rather than paid for twice. Only jobs of the files at ``paths`` (as the
        ledger names them: absolute, or under a root's name), or in the folders there, when
        given. A job another worker moved meanwhile is left to it."""
        query = select(jobs.c.id, jobs.c.state, jobs.c.result_urls, jobs.c.expires_at).where(
            jobs.c.state.in_([s.value for s in states]))
        if error_code is not None:
            query = query.where(jobs.c.error_code == error_code, jobs.c.dismissed_at.is_(None))
        if paths:
            query = query.where(_of_files_at(paths))
        with self._read() as conn:
            found = conn.execute(query).all()
        now = time.time()
        fetched = {r.id for r in found if fetchable(r.state, r.result_urls, r.expires_at, now)}
        paid = f"{message}: its result is paid for and its link lives, so it is downloaded again"
        try:
            outcomes = self.commit([self.transition_write(
                r.id, JobState.READY if r.id in fetched else JobState.PENDING,
                expect=JobState(r.state), info=TransitionInfo(
                    message=paid if r.id in fetched else message), attempts=0,
                next_attempt_at=0.0, reason=None, error_code=None, dismissed_at=None)
                for r in found]) if found else []
        except StaleTransition:  # the only one, moved meanwhile
            return Requeued(0, 0)
        moved = [r.id for r, outcome in zip(found, outcomes, strict=True) if outcome is None]
        return Requeued(len(moved), len(fetched.intersection(moved)))

    def dismiss(self, paths: Sequence[str], message: str) -> int:
        """Mark the failed and rejected jobs of the files at ``paths`` (as :meth:`reset_jobs`
        matches them) dismissed: a person accepts them unretouched, so they are no longer
        listed as needing one. Their history says so. Returns how many were marked."""
        now = time.time()
        with self._write() as conn:
            found = conn.execute(select(jobs.c.id, jobs.c.state).where(
                jobs.c.state.in_([s.value for s in DISMISSABLE]),
                jobs.c.dismissed_at.is_(None), _of_files_at(paths))).all()
            for job_id, state in found:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(dismissed_at=now))
                self._event(conn, job_id, state, state, 0, TransitionInfo(message=message), now)
        return len(found)

    def dismissed(self) -> list[str]:
        """The files whose jobs a person dismissed (see :meth:`dismiss`)."""
        query = (select(files.c.root, files.c.rel_path)
                 .select_from(files.join(jobs, jobs.c.id == files.c.job_id))
                 .where(jobs.c.dismissed_at.is_not(None))
                 .order_by(files.c.root, files.c.rel_path))
        with self._read() as conn:
            return [f"{root.rstrip('/')}/{rel}" for root, rel in conn.execute(query)]

    # ---- what the stages claim ----------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Several runs may work on this ledger at once (PostgreSQL); a SQLite ledger has one
        run at a time (its file lock), so nothing there is claimed against another."""
        return self.engine.dialect.name == "postgresql"

    def claimable(self, states: Iterable[JobState], limit: int, *,
                  exclude: Iterable[int] = (), now: float | None = None,
                  soonest_expiry_first: bool = False, owner: str | None = None,
                  roots: Sequence[str] = (), away: Collection[str] = ()) -> list[JobRow]:
        """Jobs in ``states`` whose backoff has passed and that some file still wants, one
        outside the ``away`` roots if any are (a source whose drive is not there). On a
        shared ledger with an ``owner``, the jobs are taken for that worker (only those with
        a file under one of its ``roots``, which leave the away ones out); a claim lost to a
        power cut costs nothing."""
        skip = set(exclude)
        params: dict[str, Any] = {"now": time.time() if now is None else now,
                                  "limit": limit + len(skip)}
        if self.shared and owner is not None:
            statement = _owned_claim_statement(frozenset(states), soonest_expiry_first)
            with self._write(durable=False) as conn:
                rows = conn.execute(statement, {**params, "me": owner,
                                                "roots": list(roots)}).all()
            key = ((lambda j: (j.expires_at or 0, j.id)) if soonest_expiry_first
                   else (lambda j: (j.next_attempt_at, j.id)))
            claimed = sorted(map(_job, rows), key=key)
        else:
            with self._read() as conn:
                claimed = [_job(row) for row in conn.execute(
                    _claim_statement(frozenset(states), soonest_expiry_first, bool(away)),
                    {**params, "away": list(away)})]
        return [job for job in claimed if job.id not in skip][:limit]

    def jobs_in(self, states: Iterable[JobState], limit: int | None = None, *,
                away: Collection[str] | None = None) -> list[JobRow]:
        """Jobs in these states; with ``away``, only those a file outside those sources (not
        there tonight) wants, as a run would work on."""
        query = (select(*JOB_COLUMNS).where(jobs.c.state.in_([s.value for s in states]),
                                            *([] if away is None else [WANTED_HERE]))
                 .order_by(func.coalesce(jobs.c.expires_at, 0), jobs.c.id).limit(limit))
        with self._read() as conn:
            return [_job(r) for r in conn.execute(query, {"away": list(away or ())})]

    def job(self, job_id: int) -> JobRow:
        with self._read() as conn:
            row = conn.execute(_JOB, {"job_id": job_id}).first()
        if row is None:
            raise KeyError(f"no job {job_id}")
        return _job(row)

    def states_of(self, job_ids: Collection[int]) -> dict[int, JobState]:
        with self._read() as conn:
            rows = conn.execute(select(jobs.c.id, jobs.c.state).where(
                jobs.c.id.in_(list(job_ids))))
            return {job_id: JobState(state) for job_id, state in rows}

    def files_for_job(self, job_id: int) -> list[FileRow]:
        return self.files_of([job_id]).get(job_id, [])

    def files_of(self, job_ids: Sequence[int]) -> dict[int, list[FileRow]]:
        """The files of several jobs at once (a stage claims its jobs a few dozen at a time)."""
        found: dict[int, list[FileRow]] = {}
        with self._read() as conn:
            for row in conn.execute(_FILES_OF_JOBS, {"job_ids": list(job_ids)}):
                found.setdefault(row.job_id, []).append(_file(row))
        return found

    def files_needing_output(self) -> list[FileRow]:
        """Files whose job is done but whose own output is not (yet, or any more) written."""
        query = (select(*FILE_COLUMNS).join(jobs, jobs.c.id == files.c.job_id).where(
            jobs.c.state == JobState.DONE.value, files.c.problem.is_(None),
            or_(files.c.written_sha256.is_(None),
                files.c.written_sha256 != jobs.c.result_sha256)))
        with self._read() as conn:
            return [_file(r) for r in conn.execute(query)]

    def failures_with(self, job_id: int, error_code: str) -> int:
        """How many moves of the job's history carry ``error_code``."""
        with self._read() as conn:
            return conn.scalar(select(func.count()).select_from(events).where(
                events.c.job_id == job_id, events.c.error_code == error_code)) or 0

    def files_rejected_for(self, error_code: str) -> list[FileRow]:
        """The files of the jobs rejected with ``error_code``."""
        query = select(*FILE_COLUMNS).join(jobs, jobs.c.id == files.c.job_id).where(
            jobs.c.state == JobState.REJECTED.value, jobs.c.error_code == error_code)
        with self._read() as conn:
            return [_file(r) for r in conn.execute(query)]

    def written_outputs(self) -> Iterator[tuple[int, str]]:
        """(file id, output path) of every output written."""
        query = select(files.c.id, files.c.written_rel).where(files.c.written_rel.is_not(None))
        for row in self._pages(query, files.c.id):
            yield row.id, row.written_rel

    def open_tasks(self, states: Iterable[JobState], owner: str | None = None
                   ) -> Iterator[tuple[int, str, JobState, float | None, float | None]]:
        """(job id, task id, state, submitted at, expires at) of jobs with a task in
        ``states``, oldest first. On a shared ledger with an ``owner``: that worker's tasks,
        after it has taken the ones nobody holds."""
        query = (select(jobs.c.id, jobs.c.task_id, jobs.c.state, jobs.c.submitted_at,
                        jobs.c.expires_at)
                 .where(jobs.c.state.in_([s.value for s in states]),
                        jobs.c.task_id.is_not(None)))
        if self.shared and owner is not None:
            with self._write(durable=False) as conn:
                conn.execute(update(jobs).where(
                    jobs.c.state.in_([s.value for s in states]), jobs.c.owner.is_(None))
                    .values(owner=owner))
            query = query.where(jobs.c.owner == owner)
        for row in self._pages(query, jobs.c.id):
            yield row.id, row.task_id, JobState(row.state), row.submitted_at, row.expires_at

    def _pages(self, query: Any, key: Any, page: int = 2000) -> Iterator[Any]:
        """The rows of ``query`` in ``key`` order, a page at a time (keyset pagination):
        memory stays flat however many there are, and no read is held open between pages."""
        after = 0
        while True:
            with self._read() as conn:
                rows = conn.execute(query.where(key > after).order_by(key).limit(page)).all()
            yield from rows
            if len(rows) < page:
                return
            after = getattr(rows[-1], key.name)

    @staticmethod
    def _set_output(conn: Connection, file_id: int, written_rel: str | None,
                    written_sha256: str | None, problem: str | None) -> None:
        conn.execute(_SET_OUTPUT, {"file_id": file_id, "v_written_rel": written_rel,
                                   "v_written_sha256": written_sha256, "v_problem": problem})

    def set_file_output(self, file_id: int, *, written_rel: str | None,
                        written_sha256: str | None, problem: str | None = None) -> None:
        with self._write() as conn:
            self._set_output(conn, file_id, written_rel, written_sha256, problem)

    # ---- reporting ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Jobs per state (only jobs some file still points at), plus file-level problems."""
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.state, func.count()).where(WANTED).group_by(jobs.c.state)).all()
            unreadable = conn.scalar(select(func.count()).select_from(files).where(
                files.c.job_id.is_(None), files.c.problem.is_not(None)))
        counts = {state.value: 0 for state in JobState}
        counts.update({state: n for state, n in rows})
        counts["unreadable_files"] = unreadable or 0
        return counts

    def count_in(self, states: Iterable[JobState], roots: Sequence[str] = (), *,
                 redone: bool = False, away: Collection[str] = (),
                 sent_since: float | None = None) -> int:
        """Jobs in ``states`` that some file still wants (one outside the ``away`` roots; on
        a shared ledger with ``roots``: a file under one of them, whichever worker holds the
        job); with ``redone``, only those whose photo has a result under other options; with
        ``sent_since``, those whose upload was answered since then too, whatever their state."""
        sent = {"since": sent_since} if sent_since is not None else {}
        with self._read() as conn:
            if self.shared and roots:
                return conn.scalar(_count_statement(frozenset(states), True, redone,
                                                    sent_since=bool(sent)),
                                   {"roots": list(roots), **sent}) or 0
            return conn.scalar(_count_statement(frozenset(states), False, redone, bool(away),
                                                bool(sent)),
                               {"away": list(away), **sent}) or 0

    def stripped(self) -> dict[str, int]:
        """How many jobs had each record of removed metadata ("EXIF, XMP 2": see
        ``batch.stripping``) taken off their upload."""
        query = select(jobs.c.stripped, func.count()).where(
            jobs.c.stripped.is_not(None)).group_by(jobs.c.stripped)
        with self._read() as conn:
            return {described: n for described, n in conn.execute(query)}

    def result_of(self, content_sha256: str, options_fp: str) -> str | None:
        """The hash of the result the job of a photo under these options got, if any."""
        with self._read() as conn:
            return conn.scalar(select(jobs.c.result_sha256).where(
                jobs.c.content_sha256 == content_sha256, jobs.c.options_fp == options_fp))

    def is_output(self, sha256: str) -> bool:
        """Whether a file with these contents is an output this ledger saved."""
        with self._read() as conn:
            return conn.scalar(select(files.c.id).where(
                files.c.written_sha256 == sha256).limit(1)) is not None

    def charges(self) -> int:
        with self._read() as conn:
            return conn.scalar(select(func.coalesce(func.sum(jobs.c.charges), 0))) or 0

    def unsaved_charges(self) -> int:
        """The credits paid for results no photo wants any more: its photo or its options
        changed after it was sent (see :meth:`_note_superseded`), so they are not saved."""
        with self._read() as conn:
            return conn.scalar(select(func.coalesce(func.sum(jobs.c.charges), 0)).where(
                SUPERSEDED)) or 0

    def charged_by(self, worker: str, since: float) -> int:
        """The charges (a lost answer counts as one) of the uploads ``worker`` recorded since
        ``since``: its own, where other workers on a shared ledger charge at the same time.
        Every charge is recorded as an upload leaving ``submitting`` for ``queued`` or
        ``ambiguous``."""
        query = select(func.count()).select_from(events).where(
            events.c.worker == worker, events.c.at >= since,
            events.c.from_state == JobState.SUBMITTING.value,
            events.c.to_state.in_([JobState.QUEUED.value, JobState.AMBIGUOUS.value]))
        with self._read() as conn:
            return conn.scalar(query) or 0

    def ambiguous_events(self) -> int:
        """How many uploads ever ended without a known answer (each may have been charged)."""
        with self._read() as conn:
            return conn.scalar(select(func.count()).select_from(events).where(
                events.c.to_state == JobState.AMBIGUOUS.value)) or 0

    def first_job_at(self) -> float | None:
        """When the batch began: its oldest job's creation time."""
        with self._read() as conn:
            first: float | None = conn.scalar(select(func.min(jobs.c.created_at)))
            return first

    def file_count(self) -> int:
        with self._read() as conn:
            return conn.scalar(select(func.count()).select_from(files)) or 0

    def scan_problems(self) -> list[Problem]:
        """The roots whose last scan was cut short (see :meth:`note_scan_cut`), the folders
        the last scan of each root could not list (see :meth:`note_unreadable`), and the
        photos it held back (see :meth:`note_held`)."""
        known = json.loads(self.get_meta(UNREADABLE) or "{}")
        held = json.loads(self.get_meta(HELD) or "{}")
        return [Problem(root, "unscanned", "its last scan was cut short (a stop, the "
                        "deadline): the photos it did not look at are not counted here; the "
                        "next run reads them", None, None)
                for root in sorted(json.loads(self.get_meta(CUT_SHORT) or "{}"))] + [
            Problem(f"{root.rstrip('/')}/{rel}" if rel else root, "unreadable",
                    unreadable_reason(why), None, None)
            for root, entries in sorted(known.items()) for rel, why in entries] + [
            Problem(root, "held", words, None, None) for root, words in sorted(held.items())]

    def problems(self) -> list[Problem]:
        """Every file that did not (or cannot) end retouched, with its reason; first, what
        the scans left out or held back (see :meth:`scan_problems`)."""
        waiting = and_(jobs.c.state == JobState.PENDING.value, WAITING_REASON)
        # A paid result whose download failed: its link's hours are counted.
        held = and_(jobs.c.state == JobState.READY.value, jobs.c.attempts > 0)
        query = (
            select(files.c.root, files.c.rel_path, files.c.problem, jobs.c.state, jobs.c.reason,
                   jobs.c.error_code, jobs.c.http_status, jobs.c.expires_at, jobs.c.result_urls)
            .select_from(files.outerjoin(jobs, jobs.c.id == files.c.job_id))
            .where(or_(files.c.problem.is_not(None),
                       and_(jobs.c.state.in_([s.value for s in NEEDS_ATTENTION]),
                            jobs.c.dismissed_at.is_(None)), waiting, held))
            .order_by(files.c.root, files.c.rel_path)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        result = self.scan_problems()
        now = time.time()
        for r in rows:
            path = f"{r.root.rstrip('/')}/{r.rel_path}"
            if r.problem is not None:
                result.append(Problem(path, r.state or "rejected", r.problem, None, None))
            else:
                reason = r.reason or "(no reason recorded)"
                if r.state == JobState.READY.value and r.expires_at is not None:
                    reason += (f"; paid for and kept: the same command saves it until its link "
                               f"expires, {datetime.fromtimestamp(r.expires_at):%Y-%m-%d %H:%M}")
                elif fetchable(r.state, r.result_urls, r.expires_at, now):
                    reason += f"; {fetch_again_words(r.expires_at)}"
                result.append(Problem(path, r.state, reason, r.error_code, r.http_status))
        return result

    def prepared_files(self) -> list[tuple[str, str]]:
        """Files whose upload was a prepared copy (resized, turned upright, converted), with
        what was done, by path."""
        query = (
            select(files.c.root, files.c.rel_path, jobs.c.prepared)
            .select_from(files.join(jobs, jobs.c.id == files.c.job_id))
            .where(jobs.c.prepared.is_not(None))
            .order_by(files.c.root, files.c.rel_path)
        )
        with self._read() as conn:
            return [(f"{r.root.rstrip('/')}/{r.rel_path}", r.prepared) for r in conn.execute(query)]

    def report_rows(self) -> list[dict[str, Any]]:
        """One row per file with its job's state, reason and result-link expiry."""
        query = (
            select(files.c.root, files.c.rel_path, files.c.out_rel, files.c.written_rel,
                   files.c.problem, jobs.c.state, jobs.c.reason, jobs.c.error_code,
                   jobs.c.http_status, jobs.c.request_id, jobs.c.log_id, jobs.c.expires_at,
                   jobs.c.charges, jobs.c.options_fp, jobs.c.prepared, files.c.content_sha256,
                   files.c.written_sha256, jobs.c.dismissed_at, jobs.c.result_urls)
            .select_from(files.outerjoin(jobs, jobs.c.id == files.c.job_id))
            .order_by(files.c.root, files.c.rel_path)
        )
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def annotate_waiting(self, states: Iterable[JobState], reason: str) -> int:
        """Say why jobs were left waiting (budget, clock) without changing their state."""
        with self._write() as conn:
            return conn.execute(update(jobs).where(
                jobs.c.state.in_([s.value for s in states]), WANTED).values(
                reason=reason)).rowcount or 0

    def forget_why_waiting(self) -> None:
        """Why photos waited is said by the run that left them waiting: the next one may end
        interrupted, and must not leave "the account is out of credits" on them once the
        account is topped up."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.state == JobState.PENDING.value,
                                            WAITING_REASON).values(reason=None))

    def history(self, job_id: int) -> list[dict[str, Any]]:
        query = select(events).where(events.c.job_id == job_id).order_by(events.c.id)
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
