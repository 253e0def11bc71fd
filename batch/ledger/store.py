"""All reads and writes of the ledger. :meth:`Ledger.transition` owns every job state change."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from batch import crashpoints
from batch.ledger.driver import Connections, Cursor, Statement, dialect_insert
from batch.ledger.models import events, files, folders, jobs, meta
from batch.ledger.scanrecord import ScanRecorder
from batch.scanrows import ScanRow, StagedRows
from batch.states import FINAL, REDONE_IF_LOST, JobState, check_transition


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


@dataclass(frozen=True, slots=True)
class KnownFile:
    size_bytes: int
    mtime_ns: int
    content_sha256: str | None
    job_id: int | None
    problem: str | None
    options_fp: str | None
    out_rel: str


@dataclass(slots=True)  # not frozen: a first scan makes one per file, and frozen costs 3x
class ScannedFile:
    """A file as the scanner saw it; ``content_sha256`` is None when it could not be read."""

    root: str
    rel_path: str
    out_rel: str
    size_bytes: int
    mtime_ns: int
    content_sha256: str | None
    problem: str | None = None
    options_fp: str = "000000000"


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    state: str
    reason: str
    error_code: str | None
    http_status: int | None


JOB_FIELDS = JobRow.__slots__
FILE_FIELDS = FileRow.__slots__
JOB_COLUMNS = [jobs.c[name] for name in JOB_FIELDS]
FILE_COLUMNS = [files.c[name] for name in FILE_FIELDS]


def _job(row: Sequence[Any]) -> JobRow:
    """A JobRow from a row of ``JOB_COLUMNS``."""
    (id_, sha, fp, size, state, attempts, charges, task_id, urls, submitted_at, expires_at,
     next_attempt_at, result_sha, http_status, error_code, reason) = row
    return JobRow(id_, sha, fp, size, JobState(state), attempts, charges, task_id,
                  json.loads(urls) if urls else [], submitted_at, expires_at, next_attempt_at,
                  result_sha, http_status, error_code, reason)


def _file(row: Sequence[Any]) -> FileRow:
    """A FileRow from a row of ``FILE_COLUMNS``."""
    return FileRow(*row)


#: The job is still wanted by some file (a correlated EXISTS: one index probe per job).
WANTED = exists().where(files.c.job_id == jobs.c.id)


@dataclass(frozen=True, slots=True)
class Write:
    """One ledger write, ready for :meth:`Ledger.commit`: ``run`` makes it on a cursor inside a
    transaction it may share with other writes; ``durable`` says whether it must be on disk
    before its caller goes on; ``point`` is the crash-test point reached once it is committed."""

    run: Callable[[Cursor], None]
    durable: bool = True
    point: str | None = None


class StaleTransition(RuntimeError):
    """The job was no longer in the expected state (another worker or process moved it)."""


class Ledger:
    """The job ledger. Safe to share between threads; every method is one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        self._reader = engine.execution_options(readonly=True)
        self._driver = Connections(engine)
        self._updates: dict[tuple[tuple[str, ...], bool], Statement] = {}
        self._claims: dict[tuple[tuple[str, ...], bool], Statement] = {}
        prepare = functools.partial(Statement, engine)
        self._state_of = prepare(select(jobs.c.state).where(jobs.c.id == bindparam("job_id")))
        self._event_insert = prepare(insert(events).values(
            {c: bindparam(c) for c in ("job_id", "at", "from_state", "to_state", "attempt",
                                       "http_status", "error_code", "request_id", "log_id",
                                       "message")}))
        self._job_by_id = prepare(select(*JOB_COLUMNS).where(jobs.c.id == bindparam("job_id")))
        self._files_of_job = prepare(select(*FILE_COLUMNS).where(
            files.c.job_id == bindparam("job_id")).order_by(files.c.id))
        self._set_output = prepare(update(files).where(files.c.id == bindparam("file_id")).values(
            written_rel=bindparam("written_rel"), written_sha256=bindparam("written_sha256"),
            problem=bindparam("problem")))
        self._set_problem = prepare(update(files).where(files.c.id == bindparam("file_id"))
                                    .values(problem=bindparam("problem")))
        self._insert = dialect_insert(engine)
        self._scan_recorder = ScanRecorder(engine)
        save_folder = self._insert(folders).values(
            {c: bindparam(c) for c in ("root", "rel_dir", "digest", "images")})
        self._save_folder = prepare(save_folder.on_conflict_do_update(
            index_elements=["root", "rel_dir"],
            set_={c: save_folder.excluded[c] for c in ("digest", "images")}))
        self._forget_folder = prepare(folders.delete().where(
            folders.c.root == bindparam("root"), folders.c.rel_dir == bindparam("rel_dir")))
        self._note_attempt = prepare(update(jobs).where(jobs.c.id == bindparam("job_id")).values(
            {c: bindparam(c) for c in ("attempts", "next_attempt_at", "updated_at",
                                       "http_status", "error_code")}))

    def close(self) -> None:
        self._driver.close()
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A durable write transaction (SQLite: BEGIN IMMEDIATE, so it never fails half-way on
        lock upgrade)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction: in WAL mode it waits for no writer."""
        with self._reader.begin() as conn:
            yield conn

    # ---- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._read() as conn:
            return conn.scalar(select(meta.c.value).where(meta.c.key == key))

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as conn:
            self._upsert(conn, meta, [{"key": key, "value": value}], ["key"], update_cols=["value"])

    # ---- scanning -----------------------------------------------------------------------

    def has_files(self, root: str) -> bool:
        with self._read() as conn:
            return conn.scalar(select(files.c.id).where(files.c.root == root).limit(1)) is not None

    def known_files(self, root: str, rel_dir: str) -> dict[str, KnownFile]:
        """The files the ledger knows directly in one folder (``rel_dir``, "" for the root),
        with their jobs' options: what a re-scan of a changed folder compares against."""
        query = (
            select(files.c.rel_path, files.c.size_bytes, files.c.mtime_ns,
                   files.c.content_sha256, files.c.job_id, files.c.problem, jobs.c.options_fp,
                   files.c.out_rel)
            .select_from(files.outerjoin(jobs, jobs.c.id == files.c.job_id))
            .where(files.c.root == root)
        )
        if not rel_dir:
            query = query.where(files.c.rel_path.not_like("%/%"))
        elif self._dialect == "sqlite":
            # Binary collation: a range the (root, rel_path) index answers directly.
            query = query.where(files.c.rel_path > rel_dir + "/", files.c.rel_path < rel_dir + "0")
        else:
            query = query.where(files.c.rel_path.startswith(rel_dir + "/", autoescape=True))
        depth = len(rel_dir) + 1 if rel_dir else 0
        with self._read() as conn:
            return {rel: KnownFile(size, mtime, sha, job_id, problem, fp, out_rel)
                    for rel, size, mtime, sha, job_id, problem, fp, out_rel
                    in conn.execute(query).fetchall() if "/" not in rel[depth:]}

    def folder_digests(self, root: str) -> dict[str, tuple[str, int]]:
        """Each folder's digest and image count, as the last complete scan left them."""
        query = select(folders.c.rel_dir, folders.c.digest, folders.c.images).where(
            folders.c.root == root)
        with self._read() as conn:
            return {d: (digest, n) for d, digest, n in conn.execute(query).fetchall()}

    def save_folder_digests(self, root: str, clean: dict[str, tuple[str, int]],
                            dirty: list[str]) -> None:
        """Record the folders found fully recorded (``clean``: digest and image count), and
        forget the digests of the ones that were not, so they are looked at file by file.
        A bulk write like the scan records it sums up: should a power cut undo it, the next
        scan looks at those folders file by file (a folder's digest outlives neither the
        records nor the forgetting that came before it: the WAL keeps commits in order)."""
        with self._driver.transaction(write=True, bulk=True) as cur:
            cur.executemany(self._save_folder, ("root", "rel_dir", "digest", "images"),
                            [(root, rel_dir, digest, images)
                             for rel_dir, (digest, images) in clean.items()])
            cur.executemany(self._forget_folder, ("root", "rel_dir"),
                            [(root, rel_dir) for rel_dir in dirty])

    def record_scan(self, scanned: Sequence[ScannedFile]) -> int:
        """:meth:`record_rows` for files given as :class:`ScannedFile`."""
        now = time.time()
        return self.record_rows([(f.root, f.rel_path, f.out_rel, f.size_bytes, f.mtime_ns,
                                  f.content_sha256, f.options_fp, f.problem, now)
                                 for f in scanned])

    def record_rows(self, rows: Sequence[ScanRow], staged: Sequence[StagedRows] = ()) -> int:
        """Upsert scanned files, given as rows and as rows a worker staged (each file at most
        once in all), and link each readable one to its job (content + options), creating
        jobs as needed. Returns how many new jobs were created. One bulk transaction (see
        :mod:`batch.ledger.scanrecord`), or one per ten staged parts on SQLite."""
        recorder = self._scan_recorder
        created = 0
        for images, bound in recorder.transactions(rows, staged):
            with self._driver.transaction(write=True, bulk=True, images=images) as cur:
                created += recorder.record(cur, bound)
        return created

    def options_in_use(self) -> dict[str, int]:
        """Files per effective options (after per-folder presets)."""
        query = (select(jobs.c.options_fp, func.count()).select_from(
            files.join(jobs, jobs.c.id == files.c.job_id)).group_by(jobs.c.options_fp))
        with self._read() as conn:
            return {fp: n for fp, n in conn.execute(query)}

    # ---- the state machine ----------------------------------------------------------------

    def commit(self, writes: Sequence[Write]) -> list[Exception | None]:
        """Make ``writes`` in one transaction, with one flush to disk if any is durable.
        Several writes share it each in its own savepoint: one that fails is rolled back alone
        and its error returned in its place (``None`` for the others). A single write's error
        is raised. An error of the transaction itself (the disk is full) is raised for all."""
        outcomes: list[Exception | None] = [None] * len(writes)
        with self._driver.transaction(write=True,
                                      durable=any(w.durable for w in writes)) as cur:
            if len(writes) == 1:
                writes[0].run(cur)
            else:
                for index, write in enumerate(writes):
                    cur.savepoint()
                    try:
                        write.run(cur)
                    except Exception as exc:
                        cur.rollback_to_savepoint()
                        outcomes[index] = exc
                    else:
                        cur.release()
        for write, outcome in zip(writes, outcomes, strict=True):
            if outcome is None and write.point is not None:
                crashpoints.reached(write.point)
        return outcomes

    def transition(
        self,
        job_id: int,
        target: JobState,
        *,
        expect: JobState | None = None,
        info: TransitionInfo | None = None,
        charge: bool = False,
        **fields: Any,
    ) -> None:
        """Move one job to ``target``: checked against the legal transitions, compare-and-set
        against its current (or ``expect``-ed) state, with a history row, in one transaction.
        ``charge`` counts one more upload that may have cost credits. A move whose loss the
        next run redoes for free (``REDONE_IF_LOST``) does not wait for the disk."""
        self.commit([self.transition_write(job_id, target, expect=expect, info=info,
                                           charge=charge, **fields)])

    def transition_write(
        self,
        job_id: int,
        target: JobState,
        *,
        expect: JobState | None = None,
        info: TransitionInfo | None = None,
        charge: bool = False,
        **fields: Any,
    ) -> Write:
        """:meth:`transition`, as a write to commit (alone or with others)."""

        def run(cur: Cursor) -> None:
            current = expect
            if current is None:
                state = cur.scalar(self._state_of, {"job_id": job_id})
                if state is None:
                    raise KeyError(f"no job {job_id}")
                current = JobState(state)
            check_transition(job_id, current, target)
            self._apply(cur, job_id, current, target, info, fields, charge=charge)

        return Write(run, durable=target not in REDONE_IF_LOST, point=target.value)

    def _apply(
        self,
        cur: Cursor,
        job_id: int,
        current: JobState,
        target: JobState,
        info: TransitionInfo | None,
        fields: dict[str, Any],
        *,
        charge: bool = False,
    ) -> None:
        now = time.time()
        values: dict[str, Any] = {"state": target.value, "updated_at": now}
        if info is not None:
            values.update(
                http_status=info.http_status, error_code=info.error_code,
                request_id=info.request_id, log_id=info.log_id,
            )
            if info.message is not None:
                values["reason"] = info.message
        values.update(fields)
        if isinstance(values.get("result_urls"), list):
            values["result_urls"] = json.dumps(values["result_urls"])
        statement = self._update_statement(tuple(sorted(values)), charge)
        if cur.execute(statement, {**values, "_job_id": job_id, "_from": current.value}) != 1:
            actual = cur.scalar(self._state_of, {"job_id": job_id})
            raise StaleTransition(f"job {job_id} is {actual}, expected {current.value}")
        self._event(cur, job_id, current.value, target.value, fields.get("attempts", 0), info,
                    now)

    def _update_statement(self, columns: tuple[str, ...], charge: bool) -> Statement:
        """Compiled once per column set."""
        key = (columns, charge)
        statement = self._updates.get(key)
        if statement is None:
            assignments: dict[str, Any] = {c: bindparam(c) for c in columns}
            if charge:
                assignments["charges"] = jobs.c.charges + 1
            statement = Statement(self.engine, update(jobs)
                                  .where(jobs.c.id == bindparam("_job_id"),
                                         jobs.c.state == bindparam("_from"))
                                  .values(assignments))
            self._updates[key] = statement
        return statement

    def _event(
        self,
        cur: Cursor,
        job_id: int,
        from_state: str | None,
        to_state: str,
        attempt: int,
        info: TransitionInfo | None,
        now: float,
    ) -> None:
        info = info or TransitionInfo()
        cur.execute(self._event_insert, {
            "job_id": job_id, "at": now, "from_state": from_state, "to_state": to_state,
            "attempt": attempt, "http_status": info.http_status, "error_code": info.error_code,
            "request_id": info.request_id, "log_id": info.log_id, "message": info.message,
        })

    def note_attempt_write(
        self, job_id: int, info: TransitionInfo, *, attempts: int, next_attempt_at: float
    ) -> Write:
        """A failed attempt that leaves the state as it is (e.g. a poll that hit a 5xx)."""

        def run(cur: Cursor) -> None:
            now = time.time()
            state = cur.scalar(self._state_of, {"job_id": job_id})
            cur.execute(self._note_attempt, {
                "job_id": job_id, "attempts": attempts, "next_attempt_at": next_attempt_at,
                "updated_at": now, "http_status": info.http_status,
                "error_code": info.error_code})
            self._event(cur, job_id, state, str(state), attempts, info, now)

        return Write(run)

    def recover_interrupted(self) -> dict[str, int]:
        """At start-up: work a dead process left half-done becomes explicit again.

        ``submitting`` rows are uploads whose answer was never recorded: they become
        ``ambiguous`` (maybe charged). ``downloading`` rows go back to ``ready``.
        """
        moves = {JobState.SUBMITTING: JobState.AMBIGUOUS, JobState.DOWNLOADING: JobState.READY}
        counts: dict[str, int] = {}
        messages = {
            JobState.AMBIGUOUS: "the run stopped after the upload began and before its answer "
                                "was recorded: it may have been charged",
            JobState.READY: "the run stopped while downloading; the download will be redone",
        }
        for source, target in moves.items():
            with self._driver.transaction(write=True) as cur:
                ids = [job_id for job_id, in cur.rows(Statement(
                    self.engine, select(jobs.c.id).where(jobs.c.state == source.value)))]
                for job_id in ids:
                    if target is JobState.AMBIGUOUS:
                        info = TransitionInfo(error_code="AMBIGUOUS_SUBMIT",
                                              message=messages[target])
                    else:
                        info = TransitionInfo(message=messages[target])
                    self._apply(cur, job_id, source, target, info, {},
                                charge=target is JobState.AMBIGUOUS)
            counts[target.value] = len(ids)
        return counts

    # ---- what the stages claim ----------------------------------------------------------

    def claimable(
        self,
        states: Sequence[JobState],
        limit: int,
        *,
        exclude: set[int] = frozenset(),  # type: ignore[assignment]
        now: float | None = None,
        soonest_expiry_first: bool = False,
    ) -> list[JobRow]:
        """Jobs in ``states`` whose backoff has passed and that some file still wants."""
        now = time.time() if now is None else now
        values = [s.value for s in states]
        key = (tuple(values), soonest_expiry_first)
        statement = self._claims.get(key)
        if statement is None:
            order = ((func.coalesce(jobs.c.expires_at, 0), jobs.c.id) if soonest_expiry_first
                     else (jobs.c.next_attempt_at, jobs.c.id))
            statement = Statement(self.engine, select(*JOB_COLUMNS).where(
                jobs.c.state.in_([literal(v) for v in values]),
                jobs.c.next_attempt_at <= bindparam("now"), WANTED,
            ).order_by(*order).limit(bindparam("limit")))
            self._claims[key] = statement
        with self._driver.transaction(write=False) as cur:
            rows = cur.rows(statement, {"now": now, "limit": limit + len(exclude)})
        return [job for job in map(_job, rows) if job.id not in exclude][:limit]

    def jobs_in(self, states: Sequence[JobState], limit: int | None = None) -> list[JobRow]:
        query = select(*JOB_COLUMNS).where(jobs.c.state.in_([s.value for s in states]))
        query = query.order_by(func.coalesce(jobs.c.expires_at, 0), jobs.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [_job(r) for r in conn.execute(query)]

    def job(self, job_id: int) -> JobRow:
        with self._driver.transaction(write=False) as cur:
            rows = cur.rows(self._job_by_id, {"job_id": job_id})
        if not rows:
            raise KeyError(f"no job {job_id}")
        return _job(rows[0])

    def files_for_job(self, job_id: int) -> list[FileRow]:
        with self._driver.transaction(write=False) as cur:
            return [_file(row) for row in cur.rows(self._files_of_job, {"job_id": job_id})]

    def files_needing_output(self) -> list[FileRow]:
        """Files whose job is done but whose own output is not (yet, or any more) written."""
        query = (
            select(*FILE_COLUMNS)
            .join(jobs, jobs.c.id == files.c.job_id)
            .where(
                jobs.c.state == JobState.DONE.value,
                files.c.problem.is_(None),
                or_(files.c.written_sha256.is_(None),
                    files.c.written_sha256 != jobs.c.result_sha256),
            )
        )
        with self._read() as conn:
            return [_file(r) for r in conn.execute(query)]

    def written_outputs(self) -> Iterator[tuple[int, str]]:
        """(file id, output path) of every output written."""
        query = select(files.c.id, files.c.written_rel).where(files.c.written_rel.is_not(None))
        for row in self._pages(query, files.c.id):
            yield row.id, row.written_rel

    def open_tasks(self, states: Sequence[JobState]
                   ) -> Iterator[tuple[int, str, JobState, float | None, float | None]]:
        """(job id, task id, state, submitted at, expires at) of jobs with a task in
        ``states``, oldest first."""
        query = (select(jobs.c.id, jobs.c.task_id, jobs.c.state, jobs.c.submitted_at,
                        jobs.c.expires_at)
                 .where(jobs.c.state.in_([s.value for s in states]),
                        jobs.c.task_id.is_not(None)))
        for row in self._pages(query, jobs.c.id):
            yield row.id, row.task_id, JobState(row.state), row.submitted_at, row.expires_at

    def _pages(self, query: Any, key: Any, page: int = 2000) -> Iterator[Any]:
        """The rows of ``query`` in ``key`` order, a page at a time (keyset pagination):
        memory stays flat however many there are, and no read is held open between pages."""
        after = 0
        while True:
            with self._read() as conn:
                rows = conn.execute(query.where(key > after).order_by(key).limit(page)).fetchall()
            yield from rows
            if len(rows) < page:
                return
            after = getattr(rows[-1], key.name)

    def set_file_output(
        self, file_id: int, *, written_rel: str | None, written_sha256: str | None,
        problem: str | None = None,
    ) -> None:
        with self._driver.transaction(write=True) as cur:
            cur.execute(self._set_output, {"file_id": file_id, "written_rel": written_rel,
                                           "written_sha256": written_sha256, "problem": problem})

    def finish_download_write(
        self, job_id: int, result_sha256: str, outputs: dict[int, tuple[str, str | None]],
        problems: dict[int, str],
    ) -> Write:
        """Every output written for a job recorded and the job marked done, atomically."""

        def run(cur: Cursor) -> None:
            for file_id, (rel, sha) in outputs.items():
                cur.execute(self._set_output, {"file_id": file_id, "written_rel": rel,
                                               "written_sha256": sha, "problem": None})
            for file_id, problem in problems.items():
                cur.execute(self._set_problem, {"file_id": file_id, "problem": problem})
            self._apply(cur, job_id, JobState.DOWNLOADING, JobState.DONE,
                        TransitionInfo(message=None), {"result_sha256": result_sha256,
                                                        "attempts": 0})

        return Write(run, point=JobState.DONE.value)

    # ---- reporting ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Jobs per state (only jobs some file still points at), plus file-level problems."""
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.state, func.count()).where(WANTED).group_by(jobs.c.state)
            ).all()
            unreadable = conn.scalar(
                select(func.count()).select_from(files).where(files.c.job_id.is_(None),
                                                              files.c.problem.is_not(None))
            )
        counts = {state.value: 0 for state in JobState}
        counts.update({state: n for state, n in rows})
        counts["unreadable_files"] = unreadable or 0
        return counts

    def charges(self) -> int:
        with self._read() as conn:
            return conn.scalar(select(func.coalesce(func.sum(jobs.c.charges), 0))) or 0

    def ambiguous_events(self) -> int:
        """How many uploads ever ended without a known answer (each may have been charged)."""
        with self._read() as conn:
            return conn.scalar(select(func.count()).select_from(events).where(
                events.c.to_state == JobState.AMBIGUOUS.value)) or 0

    def file_count(self) -> int:
        with self._read() as conn:
            return conn.scalar(select(func.count()).select_from(files)) or 0

    def problems(self) -> list[Problem]:
        """Every file that did not (or cannot) end retouched, with its reason."""
        bad = [JobState.FAILED.value, JobState.REJECTED.value, JobState.AMBIGUOUS.value,
               JobState.EXPIRED.value]
        waiting = and_(jobs.c.state == JobState.PENDING.value, jobs.c.reason.like("not sent:%"))
        query = (
            select(files.c.root, files.c.rel_path, files.c.problem, jobs.c.state, jobs.c.reason,
                   jobs.c.error_code, jobs.c.http_status)
            .select_from(files.outerjoin(jobs, jobs.c.id == files.c.job_id))
            .where(or_(files.c.problem.is_not(None), jobs.c.state.in_(bad), waiting))
            .order_by(files.c.root, files.c.rel_path)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        result = []
        for r in rows:
            path = f"{r.root.rstrip('/')}/{r.rel_path}"
            if r.problem is not None:
                result.append(Problem(path, r.state or "rejected", r.problem, None, None))
            else:
                result.append(Problem(path, r.state, r.reason or "(no reason recorded)",
                                      r.error_code, r.http_status))
        return result

    def report_rows(self) -> list[dict[str, Any]]:
        """One row per file with its job's state, reason and result-link expiry."""
        query = (
            select(files.c.root, files.c.rel_path, files.c.out_rel, files.c.written_rel,
                   files.c.problem, jobs.c.state, jobs.c.reason, jobs.c.error_code,
                   jobs.c.http_status, jobs.c.request_id, jobs.c.log_id, jobs.c.expires_at,
                   jobs.c.charges, jobs.c.options_fp)
            .select_from(files.outerjoin(jobs, jobs.c.id == files.c.job_id))
            .order_by(files.c.root, files.c.rel_path)
        )
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def annotate_waiting(self, states: Sequence[JobState], reason: str) -> int:
        """Say why jobs were left waiting (budget, clock) without changing their state."""
        with self._tx() as conn:
            result = conn.execute(update(jobs).where(
                jobs.c.state.in_([s.value for s in states]), WANTED).values(reason=reason))
            return result.rowcount or 0

    def history(self, job_id: int) -> list[dict[str, Any]]:
        query = select(events).where(events.c.job_id == job_id).order_by(events.c.id)
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def unfinished(self, states: Sequence[JobState]) -> int:
        with self._read() as conn:
            return conn.scalar(
                select(func.count()).select_from(jobs).where(
                    jobs.c.state.in_([s.value for s in states]), WANTED)
            ) or 0

    def reset_jobs(self, states: Sequence[JobState], message: str,
                   paths: Sequence[str] = ()) -> int:
        """Put jobs in ``states`` back to pending (the ``retry`` command)."""
        query = select(jobs.c.id, jobs.c.state).where(
            jobs.c.state.in_([literal(s.value) for s in states]))
        if paths:
            conds = [and_(files.c.root + "/" + files.c.rel_path == p) for p in paths]
            query = query.where(jobs.c.id.in_(select(files.c.job_id).where(or_(*conds))))
        moved = 0
        with self._driver.transaction(write=True) as cur:
            for job_id, state in cur.rows(Statement(self.engine, query)):
                check_transition(job_id, state, JobState.PENDING)
                self._apply(cur, job_id, JobState(state), JobState.PENDING,
                            TransitionInfo(message=message),
                            {"attempts": 0, "next_attempt_at": 0.0, "reason": None,
                             "error_code": None, "http_status": None})
                moved += 1
        return moved

    def is_final(self, state: JobState) -> bool:
        return state in FINAL

    # ---- dialect helpers ------------------------------------------------------------------

    def _upsert(self, conn: Connection, table: Any, rows: list[dict[str, Any]], keys: list[str],
                update_cols: list[str]) -> None:
        if rows:
            stmt = self._insert(table)
            stmt = stmt.on_conflict_do_update(
                index_elements=keys, set_={c: stmt.excluded[c] for c in update_cols})
            conn.execute(stmt, rows)
