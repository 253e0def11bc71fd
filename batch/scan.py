"""Finding the photos under the source folders and recording them in the ledger.

A first scan reads in the background (worker processes for many small files, threads for big
ones; see ``batch.hashing``) while it walks on and records what is back, so both cores work. A
folder seen for the first time is only listed here: a worker reads it whole into the ledger's
rows and its digest (``batch.folderread``), and this thread is left with the ledger's inserts,
which only one writer can make. A re-scan is cheap: a folder whose digest of names, sizes,
mtimes and inodes matches the ledger's is skipped with no per-file lookup; in a changed
folder, a file whose size and mtime match the ledger is not read again.
"""

from __future__ import annotations

import gc
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from batch.folderread import FolderDigest, FolderJob, FolderRead, FoldersRead
from batch.hashing import Hashed, Hasher
from batch.ledger.store import KnownFile, Ledger
from batch.names import DEFAULT_NAMING, IGNORED, IMAGE, name_kind, output_rel
from batch.options import Options
from batch.presets import PRESET_NAME, FolderSettings, apply_preset
from batch.scanrows import ScanRow, StagedRows

#: Files per hashing batch, and at least this many per batch of new folders read (but for
#: the first ones: ``FIRST_READ``, doubled each time, so the ledger's inserts start early).
BATCH = 4096
FIRST_READ = 1024
#: Files being read while the scanner walks on and records: enough to keep the workers busy
#: while this thread makes one ledger transaction.
IN_FLIGHT_FILES = 6 * BATCH
#: Rows per ledger transaction: a commit writes every page it changed, and a first scan's
#: inserts touch pages all over the jobs' content index, so fewer, bigger ones cost less.
RECORD_ROWS = 16384


@dataclass(frozen=True, slots=True)
class SourceRoot:
    """A source folder (or single file) and the prefix its outputs get under ``--out``."""

    path: Path
    out_prefix: str = ""


@dataclass(slots=True)
class ScanStats:
    found: int = 0
    hashed: int = 0
    unchanged: int = 0
    problems: int = 0
    new_jobs: int = 0
    #: New or changed files left for a later pass (still being written, or not decodable yet).
    deferred: int = field(default=0)


def settled(path: str, mtime_ns: int, settle: float, now: float) -> bool:
    """Watch mode: a file is taken once unchanged for ``settle`` seconds and it decodes
    (a copy that paused mid-way is not taken as a truncated photo; one that never decodes is
    taken after a while, so preflight can reject it with a reason)."""
    age = now - mtime_ns / 1e9
    if age < settle:
        return False
    if age > settle * 10:
        return True
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    except Exception:
        return False
    return True


def _has_line_break(text: str) -> bool:
    return "\n" in text or "\r" in text


def _digest_header(settings: FolderSettings, out_prefix: str) -> str:
    """The first line of a folder's digest: the settings its files are recorded with."""
    return (f"{settings.options.fingerprint}\0{settings.naming}\0{settings.problem}\0"
            f"{out_prefix}")


@dataclass(slots=True)  # not frozen: a first scan makes one per file, and frozen costs 3x
class Candidate:
    root: str
    rel_path: str
    out_rel: str
    abs_path: str
    size_bytes: int
    mtime_ns: int
    options_fp: str
    problem: str | None = None


@dataclass(slots=True)
class Folder:
    path: str
    rel_dir: str
    settings: FolderSettings
    #: Every file directly in it but dot-files: the folder digest sums them all up, so an
    #: unchanged folder is skipped without even looking at the names.
    files: list[os.DirEntry[str]]

    def images(self) -> list[os.DirEntry[str]]:
        return [entry for entry in self.files if name_kind(entry.name) == IMAGE]


def folders(root: SourceRoot, options: Options, exclude: tuple[Path, ...] = ()) -> Iterator[Folder]:
    """Every folder under ``root`` (not following directory symlinks), with the image-named
    files in it and the settings its ``.skinbatch.toml`` files give it."""
    base = root.path.resolve()
    excluded = {str(p.resolve()) for p in exclude}
    stack = [(str(base), "", FolderSettings(options))]
    while stack:
        directory, rel_dir, settings = stack.pop()
        try:
            with os.scandir(directory) as scanner:
                listing = list(scanner)
        except OSError:
            continue
        files, subfolders = [], []
        has_preset = False
        for entry in listing:
            name = entry.name
            if name[0] == ".":
                has_preset = has_preset or name == PRESET_NAME
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if name_kind(name) != IGNORED and entry.path not in excluded:
                        subfolders.append(entry)
                    continue
            except OSError:
                continue
            files.append(entry)
        if has_preset:
            settings = apply_preset(settings, Path(directory) / PRESET_NAME)
        for sub in subfolders:
            stack.append((sub.path, f"{rel_dir}/{sub.name}" if rel_dir else sub.name, settings))
        yield Folder(directory, rel_dir, settings, files)


def folder_digest(folder: Folder, out_prefix: str) -> str | None:
    """The :class:`FolderDigest` of ``folder`` as the walk sees it."""
    digest = FolderDigest(_digest_header(folder.settings, out_prefix))
    for entry in folder.files:
        digest.add_entry(entry)
        if digest.lines is None:
            return None
    return digest.value()


def _candidate(base: str, root: SourceRoot, entry: os.DirEntry[str], rel_dir: str,
               settings: FolderSettings, fp: str) -> Candidate:
    """The file, looked at (``stat``)."""
    name = entry.name
    rel = f"{rel_dir}/{name}" if rel_dir else name
    out_rel = output_rel(root.out_prefix, rel_dir, settings.naming, name)

    def problem(reason: str, size: int = 0, mtime: int = 0) -> Candidate:
        return Candidate(base, rel, out_rel, entry.path, size, mtime, fp, reason)

    if settings.problem is not None:
        return problem(settings.problem)
    if _has_line_break(rel):
        return problem("the file name contains a line break; rename it to process it")
    try:
        if entry.is_symlink():
            try:
                target = Path(entry.path).resolve(strict=True)
            except (OSError, RuntimeError):
                return problem("broken or looping symbolic link")
            if not target.is_relative_to(base):
                return problem("symbolic link to a file outside the source folder; not followed")
        st = entry.stat(follow_symlinks=True)
    except OSError as exc:
        return problem(f"cannot read file information: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return problem("not a regular file", 0, 0)
    return Candidate(base, rel, out_rel, entry.path, st.st_size, st.st_mtime_ns, fp)


def _row(c: Candidate, digest: str | None, problem: str | None, now: float) -> ScanRow:
    return (c.root, c.rel_path, c.out_rel, c.size_bytes, c.mtime_ns, digest, c.options_fp,
            problem, now)


def scan(
    ledger: Ledger,
    roots: list[SourceRoot],
    options: Options,
    *,
    exclude: tuple[Path, ...] = (),
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    settle: float = 0.0,
) -> ScanStats:
    """Walk the sources and bring the ledger up to date, in batches of ``BATCH`` files."""
    stats = ScanStats()
    with _no_cycle_collection(), Hasher(workers) as hasher:
        for root in roots:
            _RootScan(ledger, hasher, root, options, exclude, stats, on_progress, settle).run()
    return stats


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """A scan makes a few objects per file (entries, names, candidates, rows), none of them in
    a reference cycle: freed by their counts alone. The cycle collector would walk them over
    and over as they pile up, for nothing to free: a sixth of a first scan's CPU on 100,000
    files, and its timing made a re-scan's vary by 15 %."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(slots=True)
class _Batch:
    """Files looked at here: rows ready to record, and files being hashed."""

    rows: list[ScanRow]
    to_hash: list[Candidate]
    hashing: Future[list[Hashed]] | None

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.to_hash)

    def done(self) -> bool:
        return self.hashing is None or self.hashing.done()


@dataclass(slots=True)
class _NewDigest:
    """A new folder's digest, summed up once every part of the folder is back."""

    digest: FolderDigest
    parts: int
    images: int = 0


@dataclass(slots=True)
class _NewFolders:
    """New folders being read whole by a worker."""

    reading: Future[FoldersRead]
    size: int

    def done(self) -> bool:
        return self.reading.done()


class _RootScan:
    """One source root: walk its folders, skip the unchanged ones, read and record the rest.

    A folder's new digest is saved only after all its files are recorded without a problem
    (none still settling), in the scan's last transaction: a scan killed half-way leaves the
    folder to be looked at file by file next time, never skipped on trust."""

    def __init__(self, ledger: Ledger, hasher: Hasher, root: SourceRoot, options: Options,
                 exclude: tuple[Path, ...], stats: ScanStats,
                 on_progress: Callable[[int], None] | None, settle: float) -> None:
        self.ledger, self.hasher, self.root, self.options = ledger, hasher, root, options
        self.exclude, self.stats, self.settle = exclude, stats, settle
        self.on_progress = on_progress
        path = root.path.resolve()
        self.is_tree = path.is_dir()
        self.base = str(path if self.is_tree else path.parent)
        self.pending: list[tuple[Candidate, str | None]] = []
        self.new_folders: list[FolderJob] = []
        self.new_files = 0
        self.read_size = FIRST_READ
        self.new_digests: dict[str, _NewDigest] = {}
        #: Batches being read while the walk goes on, recorded in order. (Recording in a
        #: thread of its own was tried: SQLite drops the GIL per row, and the convoy with the
        #: walking thread made the scan slower.)
        self.in_flight: deque[_Batch | _NewFolders] = deque()
        self.in_flight_files = 0
        #: Rows waiting for the next ledger transaction: looked at here, and staged by the
        #: workers that read new folders.
        self.rows: list[ScanRow] = []
        self.staged: list[StagedRows] = []
        self.staged_rows = 0
        #: Folders looked at file by file: their new digest and image count, or None once a
        #: file there is not fine.
        self.changed: dict[str, tuple[str, int] | None] = {}
        self.seen: set[str] = set()

    def run(self) -> None:
        stored = self.ledger.folder_digests(self.base) if self.is_tree else {}
        if self.is_tree:
            self._tree(stored)
        else:
            self._single_file()
        self._flush()
        self._flush_new_folders()
        while self.in_flight:
            self._take_oldest()
        self._record_rows()
        if self.is_tree:
            clean = {d: v for d, v in self.changed.items() if v is not None}
            stale = [d for d in stored if d not in self.seen or self.changed.get(d, "") is None]
            if clean or stale:
                self.ledger.save_folder_digests(self.base, clean, stale)

    def _single_file(self) -> None:
        path = self.root.path.resolve()
        st = path.stat()
        self.stats.found += 1
        known = self.ledger.known_files(self.base, "").get(path.name)
        out_rel = output_rel(self.root.out_prefix, "", DEFAULT_NAMING, path.name)
        self._consider(Candidate(self.base, path.name, out_rel, str(path), st.st_size,
                                 st.st_mtime_ns, self.options.fingerprint), known)

    def _tree(self, stored: dict[str, tuple[str, int]]) -> None:
        fresh = not stored and not self.ledger.has_files(self.base)
        for folder in folders(self.root, self.options, self.exclude):
            self.seen.add(folder.rel_dir)
            if not folder.files:
                continue
            last = stored.get(folder.rel_dir)
            known: dict[str, KnownFile] | None = None
            if last is None and not self.settle:
                known = {} if fresh else self.ledger.known_files(self.base, folder.rel_dir)
                if not known:
                    self._new_folder(folder)
                    continue
            digest = folder_digest(folder, self.root.out_prefix)
            if digest is not None and last is not None and last[0] == digest:
                self.stats.found += last[1]
                self.stats.unchanged += last[1]
                self._progress(last[1])
                continue
            images = folder.images()
            self.stats.found += len(images)
            self.changed[folder.rel_dir] = (digest, len(images)) if digest is not None else None
            if known is None:
                known = {} if fresh else self.ledger.known_files(self.base, folder.rel_dir)
            self._look_at(folder, images, known)

    def _look_at(self, folder: Folder, images: list[os.DirEntry[str]],
                 known: dict[str, KnownFile]) -> None:
        fp = folder.settings.options.fingerprint
        for entry in images:
            candidate = _candidate(self.base, self.root, entry, folder.rel_dir, folder.settings,
                                   fp)
            self._consider(candidate, known.get(candidate.rel_path))

    def _new_folder(self, folder: Folder) -> None:
        """A folder the ledger knows nothing of: its plain files are handed to workers that
        read them into rows (taking their metadata from the open file) and the lines of the
        folder's digest, a big folder in parts of ``BATCH`` files read side by side. The
        others (symlinks, special files, names with a line break, every file of a folder
        whose settings are wrong) are looked at here, and the folder then gets no digest: it
        is looked at file by file every time."""
        settings = folder.settings
        if settings.problem is not None or _has_line_break(folder.rel_dir):
            self._careful_new_folder(folder, folder.files)
            return
        plain: list[str] = []
        others: list[os.DirEntry[str]] = []
        for entry in folder.files:
            try:
                is_plain = entry.is_file(follow_symlinks=False) and not _has_line_break(
                    entry.name)
            except OSError:
                is_plain = False
            if is_plain:
                plain.append(entry.name)
            else:
                others.append(entry)
        if others:
            self._careful_new_folder(folder, others)
        parts = [plain[start:start + BATCH] for start in range(0, len(plain), BATCH)]
        if parts and not others:
            self.new_digests[folder.rel_dir] = _NewDigest(
                FolderDigest(_digest_header(settings, self.root.out_prefix)), len(parts))
        for names in parts:
            self.new_folders.append(FolderJob(
                folder.path, folder.rel_dir, names, self.base, self.root.out_prefix,
                settings.naming, settings.options.fingerprint, not others))
            self.new_files += len(names)
            if self.new_files >= self.read_size:
                self._flush_new_folders()

    def _careful_new_folder(self, folder: Folder, entries: list[os.DirEntry[str]]) -> None:
        self.changed[folder.rel_dir] = None
        images = [entry for entry in entries if name_kind(entry.name) == IMAGE]
        self.stats.found += len(images)
        self._look_at(folder, images, {})

    def _consider(self, c: Candidate, k: KnownFile | None) -> None:
        if (k is not None and c.problem is None and k.problem is None
                and k.size_bytes == c.size_bytes and k.mtime_ns == c.mtime_ns
                and k.content_sha256 is not None):
            self.stats.unchanged += 1
            if k.job_id is not None and k.options_fp == c.options_fp and k.out_rel == c.out_rel:
                self._progress(1)
                return
            self.pending.append((c, k.content_sha256))  # re-linked, not read again
        elif (self.settle and c.problem is None
              and not settled(c.abs_path, c.mtime_ns, self.settle, time.time())):
            self.stats.deferred += 1
            self._spoil(c.rel_path)
            return
        else:
            self.pending.append((c, None))
        if len(self.pending) >= BATCH:
            self._flush()

    def _spoil(self, rel_path: str) -> None:
        folder = rel_path.rpartition("/")[0]
        if folder in self.changed:
            self.changed[folder] = None

    def _flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        rows: list[ScanRow] = []
        to_hash: list[Candidate] = []
        now = time.time()
        for c, known_sha in batch:
            if known_sha is not None:
                rows.append(_row(c, known_sha, None, now))
            elif c.problem is not None:
                rows.append(_row(c, None, c.problem, now))
            else:
                to_hash.append(c)
        hashing = (self.hasher.submit([c.abs_path for c in to_hash],
                                      sum(c.size_bytes for c in to_hash))
                   if to_hash else None)
        self._in_flight(_Batch(rows, to_hash, hashing))

    def _flush_new_folders(self) -> None:
        if not self.new_folders:
            return
        jobs, self.new_folders = self.new_folders, []
        self._in_flight(_NewFolders(self.hasher.read_folders(jobs), self.new_files))
        self.new_files = 0
        self.read_size = min(2 * self.read_size, BATCH)

    def _in_flight(self, item: _Batch | _NewFolders) -> None:
        self.in_flight.append(item)
        self.in_flight_files += item.size
        while self.in_flight_files > IN_FLIGHT_FILES:
            self._take_oldest()

    def _take_oldest(self) -> None:
        """Record the oldest batch in flight; while it is still being read, record the rows
        already back instead of waiting (the ledger's inserts are the scan's critical path)."""
        if (self.rows or self.staged) and not self.in_flight[0].done():
            self._record_rows()
        self._record(self.in_flight.popleft())

    def _record(self, item: _Batch | _NewFolders) -> None:
        self.in_flight_files -= item.size
        if isinstance(item, _NewFolders):
            staged, reads = item.reading.result()
            self.staged.append(staged)
            self.staged_rows += staged.files
            for read in reads:
                self.stats.found += read.images
                self.stats.hashed += read.hashed
                self.stats.problems += read.problems
                self._folder_read(read)
        else:
            rows = item.rows
            if item.hashing is not None:
                now = time.time()
                for c, (digest, problem, size, mtime_ns, _) in zip(
                        item.to_hash, item.hashing.result(), strict=True):
                    if digest is not None:
                        c.size_bytes, c.mtime_ns = size, mtime_ns
                        self.stats.hashed += 1
                    rows.append(_row(c, digest, problem, now))
            for row in rows:
                if row[7] is not None:
                    self.stats.problems += 1
                    self._spoil(row[1])
            self.rows.extend(rows)
        if len(self.rows) + self.staged_rows >= RECORD_ROWS:
            self._record_rows()

    def _folder_read(self, read: FolderRead) -> None:
        new = self.new_digests.get(read.rel_dir)
        if new is None:
            return  # no digest for it: marked when it was walked
        new.digest.extend(read.digest_lines)
        new.images += read.images
        new.parts -= 1
        if not new.parts:
            del self.new_digests[read.rel_dir]
            digest = new.digest.value()
            self.changed[read.rel_dir] = None if digest is None else (digest, new.images)

    def _record_rows(self) -> None:
        if self.rows or self.staged:
            rows, staged, count = self.rows, self.staged, len(self.rows) + self.staged_rows
            self.rows, self.staged, self.staged_rows = [], [], 0
            self.stats.new_jobs += self.ledger.record_rows(rows, staged)
            self._progress(count)

    def _progress(self, n: int) -> None:
        if self.on_progress:
            self.on_progress(n)
