"""Finding the photos under the source folders and recording them in the ledger.

A first scan hashes in the background (worker processes for many small files, threads for big
ones; see ``batch.hashing``) while it walks on and records the previous batch, so both cores
work. The files of a folder seen for the first time are not even looked at here: the worker
that reads one takes its size, mtime and inode from the open file, and the folder's digest is
summed up from those once the last of its files is back. A re-scan is cheap: a folder whose
digest of names, sizes, mtimes and inodes matches the ledger's is skipped with no per-file
lookup; in a changed folder, a file whose size and mtime match the ledger is not read again.
"""

from __future__ import annotations

import gc
import hashlib
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from batch.hashing import Hashed, Hasher
from batch.ledger.store import KnownFile, Ledger, ScannedFile
from batch.options import Options
from batch.presets import PRESET_NAME, FolderSettings, apply_preset

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic",
                            ".heif"})
TEMP_SUFFIXES = (".part", ".tmp", ".temp", ".crdownload", ".partial", ".download", "~")
#: Files per ledger transaction (and per hashing batch).
BATCH = 4096
#: Batches being hashed while the scanner walks on.
IN_FLIGHT = 2


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


#: A candidate's size and mtime before its file is read (new folders are not looked at first).
UNKNOWN = -1


class FolderDigest:
    """One digest of a folder's settings and of every file's name, size, mtime and inode, or
    None when the folder must be looked at file by file anyway (a symlink, a file that cannot
    be stat-ed or read). Non-image files count too (a partial download renamed into place
    changes it), so no name needs classifying to skip an unchanged folder."""

    __slots__ = ("lines",)

    def __init__(self, settings: FolderSettings, out_prefix: str) -> None:
        self.lines: list[str] | None = [
            f"{settings.options.fingerprint}\0{settings.naming}\0{settings.problem}\0"
            f"{out_prefix}"]

    def add(self, name: str, size: int, mtime_ns: int, inode: int) -> None:
        if self.lines is not None:
            self.lines.append(f"{name}\0{size}\0{mtime_ns}\0{inode}")

    def add_entry(self, entry: os.DirEntry[str]) -> None:
        """The file as the walk sees it (``lstat``)."""
        try:
            if not entry.is_symlink():
                st = entry.stat()
                self.add(entry.name, st.st_size, st.st_mtime_ns, st.st_ino)
                return
        except OSError:
            pass
        self.lines = None

    def value(self) -> str | None:
        if self.lines is None:
            return None
        self.lines.sort()
        data = "\n".join(self.lines).encode("utf-8", "surrogateescape")
        return hashlib.blake2b(data, digest_size=20).hexdigest()


@dataclass(slots=True)
class NewFolder:
    """A folder seen for the first time: its digest is summed up as its files are read."""

    rel_dir: str
    digest: FolderDigest
    images: int = 0
    waiting: int = 0
    walked: bool = False


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
    #: Set when the file is in a new folder, whose digest waits for it to be read.
    folder: NewFolder | None = None


IGNORED, IMAGE, OTHER = 0, 1, 2


def name_kind(name: str) -> int:
    """IGNORED for hidden, temporary and partial names (never taken until renamed), IMAGE for
    an image extension, else OTHER. One pass per name: it runs for every entry of every scan."""
    if name[:1] == "." or name[:2] == "~$":
        return IGNORED
    lower = name.lower()
    if lower.endswith(TEMP_SUFFIXES) or ".syncthing." in lower:
        return IGNORED
    dot = lower.rfind(".")
    return IMAGE if dot > 0 and lower[dot:] in IMAGE_SUFFIXES else OTHER


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


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
    digest = FolderDigest(folder.settings, out_prefix)
    for entry in folder.files:
        digest.add_entry(entry)
        if digest.lines is None:
            return None
    return digest.value()


def _candidate(base: str, root: SourceRoot, entry: os.DirEntry[str], rel_dir: str,
               settings: FolderSettings, fp: str, new: NewFolder | None = None) -> Candidate:
    """The file, looked at (``stat``) unless it is a plain file in a ``new`` folder: that one
    is looked at by the worker that reads it, and the candidate carries the folder along."""
    name = entry.name
    rel = f"{rel_dir}/{name}" if rel_dir else name
    out_name = settings.output_name(name)
    out_rel = _join(root.out_prefix, f"{rel_dir}/{out_name}" if rel_dir else out_name)

    def problem(reason: str, size: int = 0, mtime: int = 0) -> Candidate:
        return Candidate(base, rel, out_rel, entry.path, size, mtime, fp, reason)

    if settings.problem is not None:
        return problem(settings.problem)
    if "\n" in rel or "\r" in rel:
        return problem("the file name contains a line break; rename it to process it")
    try:
        if entry.is_symlink():
            try:
                target = Path(entry.path).resolve(strict=True)
            except (OSError, RuntimeError):
                return problem("broken or looping symbolic link")
            if not target.is_relative_to(base):
                return problem("symbolic link to a file outside the source folder; not followed")
        elif new is not None and entry.is_file(follow_symlinks=False):
            return Candidate(base, rel, out_rel, entry.path, UNKNOWN, UNKNOWN, fp, None, new)
        st = entry.stat(follow_symlinks=True)
    except OSError as exc:
        return problem(f"cannot read file information: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return problem("not a regular file", 0, 0)
    return Candidate(base, rel, out_rel, entry.path, st.st_size, st.st_mtime_ns, fp)


def _scanned(c: Candidate, digest: str | None, problem: str | None) -> ScannedFile:
    return ScannedFile(c.root, c.rel_path, c.out_rel, c.size_bytes, c.mtime_ns, digest, problem,
                       c.options_fp)


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


@dataclass
class _Batch:
    files: list[ScannedFile]
    to_hash: list[Candidate]
    hashing: Future[list[Hashed]] | None


class _RootScan:
    """One source root: walk its folders, skip the unchanged ones, hash and record the rest.

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
        #: Batches being hashed while the walk goes on, recorded in order. (Recording in a
        #: thread of its own was tried: SQLite drops the GIL per row, and the convoy with the
        #: walking thread made the scan slower.)
        self.in_flight: deque[_Batch] = deque()
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
        while self.in_flight:
            self._record(self.in_flight.popleft())
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
        self._consider(Candidate(self.base, path.name, _join(self.root.out_prefix, path.name),
                                 str(path), st.st_size, st.st_mtime_ns, self.options.fingerprint),
                       known)

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
            fp = folder.settings.options.fingerprint
            for entry in images:
                candidate = _candidate(self.base, self.root, entry, folder.rel_dir,
                                       folder.settings, fp)
                self._consider(candidate, known.get(candidate.rel_path))

    def _new_folder(self, folder: Folder) -> None:
        """A folder the ledger knows nothing of: its plain files are not looked at before
        they are read (the reader takes their metadata from the open file); the others
        (symlinks, odd names, a folder whose settings are wrong) go the careful way, and the
        folder then gets no digest: it is looked at file by file every time."""
        settings = folder.settings
        new = NewFolder(folder.rel_dir, FolderDigest(settings, self.root.out_prefix))
        fp = settings.options.fingerprint
        for entry in folder.files:
            if name_kind(entry.name) != IMAGE:
                new.digest.add_entry(entry)
                continue
            new.images += 1
            c = _candidate(self.base, self.root, entry, folder.rel_dir, settings, fp, new)
            if c.folder is None:
                new.digest.lines = None
            else:
                new.waiting += 1
            self._consider(c, None)
        self.stats.found += new.images
        new.walked = True
        self._settle_folder(new)

    def _settle_folder(self, new: NewFolder) -> None:
        if new.walked and not new.waiting:
            digest = new.digest.value()
            self.changed[new.rel_dir] = None if digest is None else (digest, new.images)

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
        files: list[ScannedFile] = []
        to_hash: list[Candidate] = []
        for c, known_sha in batch:
            if known_sha is not None:
                files.append(_scanned(c, known_sha, None))
            elif c.problem is not None:
                files.append(_scanned(c, None, c.problem))
            else:
                to_hash.append(c)
        sizes = [c.size_bytes for c in to_hash]
        hashing = (self.hasher.submit([c.abs_path for c in to_hash],
                                      None if UNKNOWN in sizes else sum(sizes))
                   if to_hash else None)
        self.in_flight.append(_Batch(files, to_hash, hashing))
        while len(self.in_flight) > IN_FLIGHT:
            self._record(self.in_flight.popleft())

    def _record(self, batch: _Batch) -> None:
        files = batch.files
        if batch.hashing is not None:
            for c, (digest, problem, size, mtime_ns, inode) in zip(
                    batch.to_hash, batch.hashing.result(), strict=True):
                if digest is not None:
                    c.size_bytes, c.mtime_ns = size, mtime_ns
                    self.stats.hashed += 1
                elif c.size_bytes == UNKNOWN:
                    c.size_bytes = c.mtime_ns = 0
                new = c.folder
                if new is not None:
                    if digest is None:
                        new.digest.lines = None
                    else:
                        new.digest.add(c.rel_path.rpartition("/")[2], size, mtime_ns, inode)
                    new.waiting -= 1
                    self._settle_folder(new)
                files.append(_scanned(c, digest, problem))
        for f in files:
            if f.problem:
                self.stats.problems += 1
                self._spoil(f.rel_path)
        self.stats.new_jobs += self.ledger.record_scan(files)
        self._progress(len(files))

    def _progress(self, n: int) -> None:
        if self.on_progress:
            self.on_progress(n)
