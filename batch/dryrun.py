"""--dry-run: what a run would send, reject and skip, and what it would cost. Changes nothing:
the scan goes into a throwaway copy of the ledger, and no upload is made."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import insert, inspect, select, text
from sqlalchemy.exc import DBAPIError

from batch import answers, elsewhere, requeue
from batch.api import ApiClient, ApiError
from batch.config import RunConfig, unreached
from batch.elsewhere import Elsewhere
from batch.ledger import Ledger, LedgerUnavailable, models, open_ledger
from batch.ledger.engine import create_ledger_engine, shown
from batch.ledger.migrate import HEAD_REVISION
from batch.ledger.store import FileRow, JobRow
from batch.ledger.workers import WorkerRow
from batch.options import NOTHING_ON, held_words, redone_words
from batch.outputs import MIN_FREE, free_space, short_of_room
from batch.pipeline import check_results_source, source_roots
from batch.preflight import COPIES_AT_ONCE, PrepareSettings, Rejected, preflight
from batch.scan import AWAY, SourceRoot, no_photos, scan, unreadable_words
from batch.states import IN_FLIGHT, JobState, submittable
from batch.stripping import tally
from batch.worker import at_work, joins_other_options


@dataclass
class Plan:
    send: list[str] = field(default_factory=list)
    reject: list[tuple[str, str]] = field(default_factory=list)
    done: int = 0
    waiting: int = 0
    files: int = 0
    credits_needed: float = 0.0
    balance: float | None = None
    balance_error: str | None = None
    #: Files whose upload would be a copy (rotated, converted, resized), with what is done.
    copy: list[tuple[str, str]] = field(default_factory=list)
    #: Blocks of metadata the uploads would leave behind, by kind.
    stripped: Counter[str] = field(default_factory=Counter)
    #: What to know before the run: why a source holds no photos, every option off, room.
    notes: list[str] = field(default_factory=list)
    #: Bytes the uploads would carry: about what their results take on --out's disk.
    upload_bytes: int = 0
    #: Photos retouched before into other output folders, whose results would be copied.
    copied: int = 0

    def to_text(self) -> str:
        lines = [f"Dry run: {self.files} file(s); nothing was sent or written.",
                 f"  would send:   {len(self.send)} image(s), about {self.credits_needed:g} "
                 "credit(s)",
                 f"  would reject: {len(self.reject)}",
                 f"  already done: {self.done}; in flight or waiting: {self.waiting}",
                 f"  retouched before into other output folders, their results copied from "
                 f"there (not paid for again): {self.copied}",
                 f"  would send as a copy: {len(self.copy)}"]
        if self.stripped:
            lines.append("  metadata removed before upload: " + ", ".join(
                f"{kind} {n}" for kind, n in sorted(self.stripped.items())))
        if self.balance is not None:
            enough = "enough" if self.balance >= self.credits_needed else "NOT enough"
            lines.append(f"  balance: {self.balance:g} credit(s): {enough}")
        elif self.balance_error:
            lines.append(f"  balance: unknown ({self.balance_error})")
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  reject {path}: {reason}" for path, reason in self.reject]
        lines += [f"  copy {path}: {note}" for path, note in self.copy]
        return "\n".join(lines)


def _copy_ledger(location: str, target: Path) -> str:
    """A private copy of a SQLite ledger (the backup API is consistent even while another
    process writes it); a database's rows are copied into it once it is open
    (:func:`_copy_rows`)."""
    if "://" in location or not Path(location).exists():
        return str(target)
    # With no WAL beside it, nobody is writing: read it as immutable, which creates no -shm.
    mode = "ro" if Path(f"{location}-wal").exists() else "ro&immutable=1"
    source = sqlite3.connect(f"file:{location}?mode={mode}", uri=True)
    copy = sqlite3.connect(target)
    with copy:
        source.backup(copy)
    source.close()
    copy.close()
    return str(target)


#: What a dry run reads of a shared ledger: its settings, its jobs and files, the folders'
#: digests (not the history, nor the workers' records).
COPIED = (models.meta, models.jobs, models.files, models.folders)


def _copy_rows(location: str, copy: Ledger) -> bool:
    """The rows of :data:`COPIED`, read from one snapshot of the database, written into the
    dry run's new ledger. A database no run has brought to this version's schema yet (a new
    one, or one the run would migrate first) gives no rows (False): the dry run starts from
    empty, as its columns are not this version's."""
    source = create_ledger_engine(location)
    try:
        with source.connect() as read, copy.engine.begin() as write:
            # One snapshot for every table: a file is not read without the job it names.
            read.execution_options(isolation_level="REPEATABLE READ")
            if not inspect(read).has_table("alembic_version") or read.scalar(
                    text("SELECT version_num FROM alembic_version")) != HEAD_REVISION:
                return False
            for table in COPIED:
                write.execute(table.delete())  # a new ledger's own settings give way
                rows = read.execute(select(table))
                while chunk := rows.fetchmany(5000):
                    write.execute(insert(table), [row._asdict() for row in chunk])
        return True
    except DBAPIError as exc:
        why = str(exc.orig).splitlines()[0]
        raise LedgerUnavailable(f"cannot read the ledger {shown(location)}: {why}") from None
    finally:
        source.dispose()


def _joining(config: RunConfig) -> str | None:
    """What would refuse the run as a worker of the shared ledger's batch. Opening a ledger at
    this version's schema (:func:`_copy_rows` found it so) writes nothing."""
    shared = open_ledger(config.ledger_location)
    try:
        return joins_other_options(shared, config.options)
    finally:
        shared.close()


class Upload(NamedTuple):
    """What a file's upload would be: its size, what would be done to bring it within the
    API's limits, and the metadata it would go without."""

    size: int
    note: str | None
    stripped: str | None


def _check(job: JobRow, candidates: list[FileRow], settings: PrepareSettings
           ) -> tuple[str, str | Upload]:
    """The verdict a real run's preflight would give (its settings included): the reason it
    would be rejected, or what would be sent. Only its figures are kept: the upload and a
    copy's pixels (tens of MB for a camera file) go as soon as it is made."""
    for f in candidates:
        path = Path(f.root) / f.rel_path
        try:
            prepared = preflight(path.read_bytes(), settings)
            return str(path), Upload(len(prepared.payload), prepared.note, prepared.stripped)
        except Rejected as rejected:
            return str(path), rejected.reason
        except OSError as exc:
            return str(path), f"cannot read the file: {exc.strerror}"
    return "(no file)", "the file disappeared after it was scanned"


def _room(config: RunConfig, results: int) -> str | None:
    """What the disks would let the run do: refuse it, or stop its uploads part-way."""
    if (short := short_of_room(config.written_folders)) is not None:
        return f"The run would be refused: {short}."
    free = free_space(config.out.expanduser().resolve())
    if free is not None and results > free - MIN_FREE:
        return (f"The results would take about {results / 2**20:,.0f} MB on the disk of "
                f"{config.out}, which has {free / 2**20:,.0f} MB free: uploads would stop when "
                f"{MIN_FREE // 2**20} MB are left, and the rest wait for room.")
    return None


def plan(config: RunConfig) -> Plan:
    workdir = Path(tempfile.mkdtemp(prefix="skinbatch-dry-run-"))
    try:
        ledger = open_ledger(_copy_ledger(config.ledger_location, workdir / "ledger.sqlite"),
                             name=config.ledger_location)
        try:
            joining = None
            if config.ledger_file is None and _copy_rows(config.ledger_location, ledger):
                joining = _joining(config)
            result = _planned(ledger, config)
            if joining is not None:
                result.notes.append(f"The run would be refused: {joining}")
        finally:
            ledger.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if config.api_key is not None:
        result.balance, result.balance_error = asyncio.run(_balance(config))
    return result


def _planned(ledger: Ledger, config: RunConfig) -> Plan:
    check_results_source(ledger, config)  # the run's refusal, said by its dry run too
    roots = source_roots(config.sources, config.root_map)
    # A source not there tonight: as the run does, its photos wait for one that finds it.
    gone = [r for r in roots if unreached(r.path) is not None]
    away = {r.ledger_root for r in gone}
    kept, under_way = _at_start(ledger, config)
    others, copied = elsewhere.at_start(ledger, config)
    result = _scanned(ledger, config, [r for r in roots if r not in gone], gone, others)
    result.copied += copied
    to_send = submittable(config.on_ambiguous, config.on_expired)
    if redone := ledger.count_in(to_send, redone=True, away=away):
        result.notes.append(redone_words(redone))
    _judge(result, config, _wanted(ledger, config, roots, to_send, away))
    counts = ledger.counts()
    result.done = counts[JobState.DONE.value] - result.copied
    result.waiting = sum(counts[s.value] for s in IN_FLIGHT)
    result.credits_needed = len(result.send) * config.credits_per_image
    result.reject += [(p.path, p.reason) for p in ledger.problems()
                      if p.state == "rejected" and (p.path, p.reason) not in result.reject]
    if (room := _room(config, result.upload_bytes)) is not None:
        result.notes.append(room)
    result.notes += [_under_way_words(run) for run in under_way]
    if kept:
        result.notes.append(f"{kept} upload(s) answered while the ledger was away would be "
                            "recorded, not paid for again.")
    return result


def _wanted(ledger: Ledger, config: RunConfig, roots: list[SourceRoot],
            to_send: frozenset[JobState], away: set[str]) -> list[tuple[JobRow, list[FileRow]]]:
    """Each job a run would send with the files it would read it from: on a shared ledger
    only those under its own sources, and none on a drive that is not there."""
    shared, mine = config.ledger_file is None, {r.ledger_root for r in roots}
    return [(job, found) for job in ledger.jobs_in(to_send, away=away)
            if (found := [f for f in ledger.files_for_job(job.id)
                          if f.root not in away and (not shared or f.root in mine)])]


def _at_start(ledger: Ledger, config: RunConfig) -> tuple[int, list[WorkerRow]]:
    """What a run's start does, done to the copy: answers kept while the ledger was away
    recorded, uploads a killed run left without an answer made ambiguous (sent again, if so,
    paid), photos put back in line. A run at work on a SQLite ledger is no killed run: its
    uploads under way are in flight, and the photos left to send are its own line. Returns
    the answers recorded and the runs at work."""
    kept = answers.record(ledger, answers.kept(config.ledger_file))
    under_way = at_work(ledger) if config.ledger_file is not None else []
    if not under_way:
        ledger.recover_interrupted()
    requeue.at_start(ledger, config.root_map)
    return kept, under_way


def _under_way_words(run: WorkerRow) -> str:
    started = datetime.fromtimestamp(run.started_at).astimezone().isoformat(timespec="minutes")
    return (f"A run is under way on this ledger (started {started}, pid {run.pid} on "
            f"{run.host}): it sends the photos counted here as to send; a run started now "
            "would be refused until it ends.")


def _scanned(ledger: Ledger, config: RunConfig, roots: list[SourceRoot],
             gone: list[SourceRoot], others: Elsewhere | None) -> Plan:
    """The sources there scanned into the copy, and what the scan found to say of them."""
    stats = scan(ledger, roots, config.options, exclude=(config.out.resolve(),),
                 prepare=config.prepare, out_dir=config.out.resolve(),
                 on_collision=config.on_collision, earlier=others, pay_again=config.pay_again)
    return Plan(files=ledger.file_count(), copied=stats.copied, notes=[
        *(f"{r.path} is {AWAY}: its photos wait for a run that finds it, and are not "
          "counted here." for r in gone),
        *(words for _, words in stats.left_out),
        *(f"{unreadable_words(*entry)}." for entry in stats.unreadable_folders),
        *(no_photos(ledger, root, config.options) for root in stats.empty_roots),
        *([held_words(stats.held)] if stats.held else []),
        *([] if config.options.enabled else [NOTHING_ON])])


def _judge(result: Plan, config: RunConfig, wanted: list[tuple[JobRow, list[FileRow]]]) -> None:
    """Preflight's verdict on each job the run would send (with its files), counted into
    ``result``; as many at once as a run prepares, as each holds a camera file's pixels."""
    with ThreadPoolExecutor(COPIES_AT_ONCE) as pool:
        checks = pool.map(lambda item: _check(item[0], config.root_map.localize(item[1]),
                                              config.prepare), wanted)
        for path, verdict in checks:
            if isinstance(verdict, str):
                result.reject.append((path, verdict))
                continue
            result.send.append(path)
            result.upload_bytes += verdict.size
            if verdict.note:
                result.copy.append((path, verdict.note))
            result.stripped += tally(verdict.stripped)


async def _balance(config: RunConfig) -> tuple[float | None, str | None]:
    assert config.api_key is not None
    client = ApiClient(config.api_base, config.api_key)
    try:
        return await client.balance(), None
    except ApiError as error:
        return None, error.describe()
    finally:
        await client.aclose()
