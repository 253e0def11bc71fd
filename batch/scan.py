"""Finding the photos under the source folders and recording them in the ledger.

A walk (``os.scandir``, links to folders not followed), photos hashed in a thread pool
(``hashlib.file_digest`` drops the GIL while it reads and hashes), and the rows recorded in
batches through :meth:`Ledger.record_files`. A re-scan is cheap: a folder whose digest of
names, sizes, mtimes and inodes matches the one the last complete scan saved is skipped with no
per-file lookup, and in a changed folder a file whose size and mtime match the ledger is not
read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

from batch.elsewhere import Elsewhere
from batch.heif import unsupported as heif_unsupported
from batch.ledger.store import (
    NOT_SAVED,
    Born,
    KnownFile,
    Ledger,
    ScannedFile,
    Superseded,
    unreadable_reason,
)
from batch.names import (
    DEFAULT_NAMING,
    IMAGE,
    IMAGE_SUFFIXES,
    NAME_MAX,
    NOT_UTF8,
    RAW_SUFFIXES,
    STATE_DIR,
    folder_skipped,
    is_utf8,
    name_kind,
    output_rel,
    shown,
)
from batch.options import Options, held_words
from batch.outputs import folds_case, name_refused, sha256_file, taken_by_another
from batch.preflight import (
    NO_HEIF,
    Inspection,
    PrepareSettings,
    Rejected,
    check,
    photo_key,
)
from batch.presets import PRESET_NAME, FolderSettings, apply_preset
from batch.states import JobState
from batch.stripping import strippable

log = logging.getLogger("batch.scan")

#: Files per ledger transaction; one batch is hashed while the one before is recorded. The
#: first batches are smaller (from FIRST_BATCH, doubling): the first upload waits until every
#: file of the first batch is hashed and judged, so that batch holds only two (the cores are
#: shared with the run's first requests).
BATCH = 1000
FIRST_BATCH = 2
#: Paid results left unsaved by a changed photo or option, named one by one in a scan.
SUPERSEDED_SHOWN = 20
#: A source folder that is not there: its photos wait for a run that finds it.
AWAY = "not there, its drive unplugged or its share not mounted"
#: Files per pool task at most (one pool task per small file costs more than hashing it).
HASH_CHUNK = 32



@dataclass(frozen=True, slots=True)
class SourceRoot:
    """A source folder (or single file) and the prefix its outputs get under ``--out``."""

    path: Path
    out_prefix: str = ""
    #: The ledger's name for it where a root map names it (see ``batch.roots``).
    key: str | None = None
    #: The local folder its files lie in: told once, while the source is there, so that a
    #: share whose server goes down later does not turn a folder into a file's parent.
    base: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.base:  # a source not there is a folder (a photo not there is refused)
            path = self.path.resolve()
            object.__setattr__(self, "base", str(path.parent if os.path.isfile(path) else path))

    @property
    def ledger_root(self) -> str:
        """What the ledger records its files under (``files.root``)."""
        return self.key or self.base


@dataclass(slots=True)
class ScanStats:
    found: int = 0
    hashed: int = 0
    unchanged: int = 0
    problems: int = 0
    #: New jobs waiting to be sent (not those that start rejected).
    new_jobs: int = 0
    #: New jobs done already: retouched before into another output folder, copied from there.
    copied: int = 0
    #: New or changed files left for a later pass (still being written, or not decodable yet).
    deferred: int = 0
    #: Photos retouched and saved under other options, not sent again (see ``pay_again``).
    held: int = 0
    #: Sources whose scan a stop cut short: their photos not looked at wait for the next scan.
    stopped: int = 0
    #: Source folders in which no photo was found (:func:`no_photos` says why).
    empty_roots: list[SourceRoot] = field(default_factory=list)
    #: Folders under a source left out (an earlier run's results, a link to a folder
    #: elsewhere), each with the words that say why (see :func:`folders`).
    left_out: list[tuple[str, str]] = field(default_factory=list)
    #: Folders that could not be listed (not this user's, a share failing), with why: their
    #: photos are left out until they can be (see :func:`unreadable_words`).
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: ScanStats) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class FileRead(NamedTuple):
    """A file as the scan read it: its content hash, or why it could not be read; its size and
    mtime (ns) from the open file; and preflight's reason to refuse the content, if asked."""

    sha256: str | None
    problem: str | None
    size: int
    mtime_ns: int
    rejected: str | None = None


def read_file(path: str, prepare: PrepareSettings | None = None,
              by_image: bool = False) -> FileRead:
    """Hash a file (its :func:`photo_key`) and, with ``prepare``, ask preflight's verdict of
    the same bytes (the file is read once). Size and mtime are taken from the open file
    before reading: a change while it is read shows as a newer mtime next time. O_NONBLOCK:
    a FIFO named like a photo must not hang the scan in open()."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return FileRead(None, "the file disappeared while it was being scanned", 0, 0)
    except PermissionError:
        return FileRead(None, "permission denied: the file cannot be read", 0, 0)
    except OSError as exc:
        return FileRead(None, f"cannot read the file: {exc.strerror or exc}", 0, 0)
    with open(fd, "rb", buffering=0) as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return FileRead(None, "not a regular file", 0, 0)
        try:
            head = os.pread(fd, 12, 0)
            if heif_unsupported(head):
                return FileRead(None, NO_HEIF, 0, 0)  # looked at again by each scan
            if not (by_image and strippable(head)):
                # Its key is the whole file's hash, and its check needs only its header: a
                # TIFF master of a few hundred MB is not held whole (one per hashing thread).
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
                _, rejected = _verdict(handle, st.st_size, prepare)
                return FileRead(digest, None, st.st_size, st.st_mtime_ns, rejected)
            data = handle.readall()
        except OSError as exc:
            return FileRead(None, f"cannot read the file: {exc.strerror or exc}", 0, 0)
    inspection, rejected = _verdict(data, st.st_size, prepare)
    digest = photo_key(data, by_image, inspection)
    return FileRead(digest, None, st.st_size, st.st_mtime_ns, rejected)


def _verdict(data: bytes | BinaryIO, size: int, prepare: PrepareSettings | None
             ) -> tuple[Inspection | None, str | None]:
    """Preflight's check of the file (its bytes, or the open file): what it is, or why it
    would be refused; neither without ``prepare``."""
    if prepare is None:
        return None, None
    try:
        return check(data, prepare, size), None
    except Rejected as refusal:
        return None, refusal.reason


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


@dataclass(slots=True)
class Folder:
    path: str
    rel_dir: str
    settings: FolderSettings
    #: Every file directly in it but dot-files: the folder digest sums them all up, so an
    #: unchanged folder is skipped without looking at the names.
    files: list[os.DirEntry[str]]
    #: The names of the subfolders walked.
    subfolders: list[str]

    def images(self) -> list[os.DirEntry[str]]:
        return [entry for entry in self.files if name_kind(entry.name) == IMAGE]

    def digest(self, out_prefix: str) -> str | None:
        """One digest of the folder's settings and of every file's name, size, mtime and
        inode; None when it must be looked at file by file anyway (a symlink, a file that
        cannot be stat-ed). Non-image files count too: a partial download renamed into
        place changes it."""
        s = self.settings
        lines = [f"{s.options.fingerprint}\0{s.naming}\0{s.problem}\0{out_prefix}"]
        for entry in self.files:
            try:
                if entry.is_symlink():
                    return None
                st = entry.stat(follow_symlinks=False)
            except OSError:
                return None
            lines.append(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}")
        data = "\n".join(sorted(lines)).encode("utf-8", "surrogateescape")
        return hashlib.blake2b(data, digest_size=20).hexdigest()


def folders(root: SourceRoot, options: Options, exclude: tuple[Path, ...] = (),
            left_out: list[tuple[str, str]] | None = None,
            unreadable: list[tuple[str, str]] | None = None) -> Iterator[Folder]:
    """Every folder under ``root``, with the files in it and the settings its
    ``.skinbatch.toml`` files give it. Left out, with their subtree, and listed in ``left_out``
    with why: a folder below the root that holds a ``.skinbatch`` folder, an earlier run's
    output (a source's parent given, with last month's results in it), whose photos are
    retouched already; and a link to a folder outside the source, which could reach far
    more photos than the source shows (a whole archive), each paid for. A link to a folder
    inside the source is passed over: its photos are scanned in their own place, and so are,
    in silence, hidden and system folders (:func:`batch.names.folder_skipped`). A folder that
    cannot be listed is listed in ``unreadable``, with why."""
    excluded = {str(p.resolve()) for p in exclude}
    base = str(root.path.resolve())
    left_out = [] if left_out is None else left_out
    unreadable = [] if unreadable is None else unreadable
    stack = [(base, "", FolderSettings(options))]
    while stack:
        directory, rel_dir, settings = stack.pop()
        if (listing := _listed(directory, unreadable)) is None:
            continue
        settings, files, subfolders, results = _sorted(listing, rel_dir, settings, base,
                                                       excluded, left_out)
        if results:
            left_out.append((directory, results_left_out(directory)))
            continue
        for sub in subfolders:
            stack.append((sub.path, f"{rel_dir}/{sub.name}" if rel_dir else sub.name, settings))
        yield Folder(directory, rel_dir, settings, files, [sub.name for sub in subfolders])


def _sorted(listing: list[os.DirEntry[str]], rel_dir: str, settings: FolderSettings, base: str,
            excluded: set[str], left_out: list[tuple[str, str]]
            ) -> tuple[FolderSettings, list[os.DirEntry[str]], list[os.DirEntry[str]], bool]:
    """A folder's entries sorted: the settings its preset gives it, its files, the subfolders
    to walk, and whether it holds a run's state folder (it is an earlier run's results). A
    link to a folder outside the source goes in ``left_out``."""
    files, subfolders, results = [], [], False
    for entry in listing:
        if entry.name.startswith("."):
            if entry.name == PRESET_NAME:
                settings = apply_preset(settings, Path(entry.path))
            elif entry.name == STATE_DIR and rel_dir:
                with contextlib.suppress(OSError):
                    results = entry.is_dir(follow_symlinks=False)
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            # isdir: a looping or broken link is a file's problem, said with the file
            linked = not is_dir and entry.is_symlink() and os.path.isdir(entry.path)
        except OSError:
            continue
        if linked:
            if link := _link_left_out(entry, base, excluded):
                left_out.append(link)
        elif not is_dir:
            files.append(entry)
        elif not folder_skipped(entry.name) and entry.path not in excluded:
            subfolders.append(entry)
    return settings, files, subfolders, results


def _listed(directory: str, unreadable: list[tuple[str, str]]) -> list[os.DirEntry[str]] | None:
    """The folder's entries; None when it is gone since its parent was listed, or cannot be
    listed (then noted in ``unreadable``, with why)."""
    try:
        with os.scandir(directory) as scanner:
            return list(scanner)
    except FileNotFoundError:
        return None
    except OSError as exc:
        unreadable.append((directory, exc.strerror or str(exc)))
        return None


def _link_left_out(entry: os.DirEntry[str], base: str,
                   excluded: set[str]) -> tuple[str, str] | None:
    """A link to a folder outside the source (and outside --out), with the words that say why
    it is left out; None for one to a folder inside it, whose photos are scanned there."""
    target = os.path.realpath(entry.path)
    if folder_skipped(entry.name) or any(
            Path(target).is_relative_to(folder) for folder in (base, *excluded)):
        return None
    return entry.path, linked_folder_left_out(entry.path, target)


def results_left_out(folder: str) -> str:
    return (f"Left out {folder}: it holds an earlier run's results (its {STATE_DIR} folder), "
            "and sending them would pay to retouch retouched photos. To send them, give it as "
            "a SOURCE of its own.")


def linked_folder_left_out(link: str, target: str) -> str:
    return (f"Left out {link}: it is a link to the folder {target}, and links to folders are "
            "not followed, as one can reach many more photos than meant, each paid for. To "
            f"send its photos, give {target} as a SOURCE of its own.")


def unreadable_words(folder: str, why: str) -> str:
    return f"{folder}: {unreadable_reason(why)}"


#: Ledger meta: the folders left out that a run has warned of.
LEFT_OUT_TOLD = "results_folders_told"


def tell_left_out(ledger: Ledger, left_out: list[tuple[str, str]]) -> None:
    """A warning the first time a folder is left out (a run's scan, a watch's pass); after
    that, one line of the log, so that a cron job over a tree that keeps such folders is
    quiet again."""
    told = ledger.told_before(LEFT_OUT_TOLD, [folder for folder, _ in left_out])
    for folder, words in left_out:
        log.log(logging.INFO if folder in told else logging.WARNING, "%s", words)


def no_photos(ledger: Ledger, root: SourceRoot, options: Options) -> str:
    """Why a source folder gave no photos, in words a person can act on: it is empty (where
    earlier runs recorded photos, perhaps the mount point of a share not mounted), or its
    files are of other kinds (camera RAW among them)."""
    left_out: list[tuple[str, str]] = []
    kinds = Counter(os.path.splitext(entry.name)[1].lower() or "(no extension)"
                    for folder in folders(root, options, left_out=left_out)
                    for entry in folder.files)
    if not kinds and left_out:
        text = (f"No photos in {root.path} but in the folders left out (said above): "
                f"{', '.join(folder for folder, _ in left_out)}.")
    elif not kinds and not os.path.isdir(root.path):
        return f"No photos in {root.path}: it is {AWAY}."
    elif not kinds:
        text = f"No photos in {root.path}: the folder is empty."
    else:
        listed = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common(5))
        text = (f"No photos in {root.path}: none of its {kinds.total()} file(s) is of a kind "
                f"skinbatch sends ({listed}); it sends {', '.join(sorted(IMAGE_SUFFIXES))}.")
        if RAW_SUFFIXES & kinds.keys():
            text += " Camera RAW files are not sent: export them as JPEG or TIFF first."
    if ledger.has_files(root.ledger_root):
        text += " Earlier runs found photos there: if it is a network share, is it mounted?"
    return text


def _candidate(key: str, base: str, root: SourceRoot, entry: os.DirEntry[str], rel_dir: str,
               settings: FolderSettings, out_dir: Path | None) -> ScannedFile:
    """The file, looked at (``stat``), with the reason it cannot be taken if there is one."""
    name = entry.name
    rel = f"{rel_dir}/{name}" if rel_dir else name
    out_rel = output_rel(root.out_prefix, rel_dir, settings.naming, name)
    fp = settings.options.fingerprint

    def problem(reason: str) -> ScannedFile:
        return ScannedFile(key, rel, out_rel, 0, 0, None, fp, reason)

    if not is_utf8(rel):
        return ScannedFile(key, shown(rel), shown(out_rel), 0, 0, None, fp, NOT_UTF8)
    if settings.problem is not None:
        return problem(settings.problem)
    if "\n" in rel or "\r" in rel:
        return problem("the file name contains a line break; rename it to process it")
    out_name = out_rel.rpartition("/")[2]
    if len(out_name.encode()) > NAME_MAX:  # a naming template made it longer
        return problem(f"its output's name would be {len(out_name.encode())} bytes long, more "
                       f"than a file name may be ({NAME_MAX}): shorten the file's name or the "
                       "folder's naming")
    if out_dir is not None and (refused := name_refused(out_dir, out_rel)) is not None:
        return problem(refused)
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
        return problem("not a regular file")
    return ScannedFile(key, rel, out_rel, st.st_size, st.st_mtime_ns, None, fp)


def scan(ledger: Ledger, roots: list[SourceRoot], options: Options, *,
         exclude: tuple[Path, ...] = (), on_progress: Callable[[int], None] | None = None,
         settle: float = 0.0, workers: int | None = None,
         prepare: PrepareSettings | None = None,
         should_stop: Callable[[], bool] | None = None,
         out_dir: Path | None = None, on_collision: str = "skip",
         earlier: Elsewhere | None = None, pay_again: bool = False) -> ScanStats:
    """Walk the sources and bring the ledger up to date. ``settle`` (watch mode): a new or
    changed file is taken only once it has been still that long and decodes. ``prepare``: a
    new file preflight would refuse makes a rejected job, with the reason, never a pending
    one (so it is in no credit estimate and no budget). ``should_stop`` (asked between
    files): end early, recording what was read and trusting no folder digest.
    ``out_dir``: a file whose output that folder's disk would not take, or (``on_collision``
    "skip") whose output path holds a file skinbatch did not save, is refused before it is
    paid for. ``earlier``: a new photo another output folder holds retouched under the same
    options is not paid for again (:meth:`_RootScan._retouched_before`). Without
    ``pay_again``, a photo retouched and saved under other options keeps its result and is not
    sent again (:meth:`_RootScan._held`)."""
    stats = ScanStats()
    workers = workers or min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
    # Left by an error or Ctrl-C (a dry run's KeyboardInterrupt): the reads under way stop
    # at their file rather than the pool's exit waiting for every photo queued.
    left = threading.Event()
    stop = should_stop or (lambda: False)
    with ThreadPoolExecutor(workers, thread_name_prefix="hash") as pool, \
            earlier.kept_open() if earlier is not None else contextlib.nullcontext():
        try:
            for root in roots:
                stats.add(_RootScan(ledger, pool, workers, root, options, exclude, on_progress,
                                    settle, prepare, lambda: left.is_set() or stop(), out_dir,
                                    on_collision, earlier, pay_again).run())
        finally:
            left.set()
    return stats


def read_files(paths: list[str], prepare: PrepareSettings | None, by_image: bool,
               should_stop: Callable[[], bool]) -> dict[str, FileRead]:
    """The reads of ``paths`` by path, up to a stop: a chunk of large photos on a share takes
    long enough that Ctrl-C, SIGTERM or the deadline must not wait for it."""
    reads = {}
    for path in paths:
        if should_stop():
            break
        reads[path] = read_file(path, prepare, by_image)
    return reads


def _below(recorded: Iterable[str]) -> dict[str, set[str]]:
    """For each folder, the names of its subfolders that hold or lead to a recorded folder."""
    below: dict[str, set[str]] = defaultdict(set)
    for rel_dir in recorded:
        parts = rel_dir.split("/") if rel_dir else []
        for depth, name in enumerate(parts):
            below["/".join(parts[:depth])].add(name)
    return below


@dataclass(slots=True)
class _Batch:
    """Files recorded in one transaction (as the walk saw them, with their paths), and the
    ones among them being read (in chunks of ``HASH_CHUNK``: one pool task per file costs
    more than hashing a small one)."""

    files: list[tuple[ScannedFile, str]]
    reading: list[Future[dict[str, FileRead]]]


def _one_output_each(candidates: list[ScannedFile],
                     known: dict[str, KnownFile]) -> list[ScannedFile]:
    """A new photo whose output name another photo of its folder takes (a naming without
    {ext}: IMG_1.jpg and IMG_1.tif both IMG_1_r.jpg) is not sent, as its result could not be
    saved there. A photo the ledger has read keeps its name; then the first by name does."""
    def read(c: ScannedFile) -> bool:
        k = known.get(c.rel_path)
        return k is not None and k.content_sha256 is not None

    owners: dict[str, str] = {}
    for c in sorted(candidates, key=lambda c: (not read(c), c.rel_path)):
        if c.problem is None:
            owners.setdefault(c.out_rel, c.rel_path)
    return [c if c.problem is not None or read(c) or owners[c.out_rel] == c.rel_path else
            c._replace(problem=(
                f"its output would be {c.out_rel}, which the result of "
                f"{owners[c.out_rel].rpartition('/')[2]} takes (the folder's naming leaves out "
                "the extension): not sent, as its result could not be saved there (put {ext} "
                "or {name} in the naming, or set on_collision to \"suffix\")"))
            for c in candidates]


class _RootScan:
    """One source root. A folder's new digest is saved only once all its files are recorded
    without a problem (none still settling), at the end: a scan killed half-way leaves the
    folder to be looked at file by file next time, never skipped on trust."""

    def __init__(self, ledger: Ledger, pool: ThreadPoolExecutor, workers: int, root: SourceRoot,
                 options: Options, exclude: tuple[Path, ...],
                 on_progress: Callable[[int], None] | None, settle: float,
                 prepare: PrepareSettings | None, should_stop: Callable[[], bool],
                 out_dir: Path | None, on_collision: str, earlier: Elsewhere | None,
                 pay_again: bool) -> None:
        self.ledger, self.pool, self.root, self.options = ledger, pool, root, options
        self.exclude, self.on_progress, self.settle = exclude, on_progress, settle
        self.prepare, self.should_stop, self.out_dir = prepare, should_stop, out_dir
        self.on_collision, self.earlier, self.pay_again = on_collision, earlier, pay_again
        #: Two photos of one output name: under "skip" the second paid result is refused,
        #: under "overwrite" it replaces the first's; only "suffix" gives each a name.
        self.one_name_each = on_collision != "suffix"
        #: New photos whose output path holds a file already (see :meth:`_note_taken`).
        self.taken: dict[str, Path] = {}
        #: On a disk of --out that does not tell case apart, which photo each output name,
        #: case folded, goes to (see :meth:`_one_name_each`).
        self.folded: dict[str, str] | None = (
            {} if out_dir is not None and self.one_name_each and folds_case(out_dir) else None)
        self.batch_size = FIRST_BATCH
        self.workers = workers
        self.stopped = False
        self.is_tree = root.base == str(root.path.resolve())
        self.base, self.key = root.base, root.ledger_root
        self.stats = ScanStats()
        self.batch: list[tuple[ScannedFile, str]] = []
        #: Batches being hashed, recorded oldest first while the walk goes on.
        self.in_flight: deque[_Batch] = deque()
        #: Folders looked at file by file: their new digest and image count, or None once a
        #: file there is not fine.
        self.changed: dict[str, tuple[str, int] | None] = {}
        #: Paid results no file wants any more (see :meth:`_say_superseded`).
        self.superseded = 0

    def run(self) -> ScanStats:
        stored: dict[str, tuple[str, int]] = {}
        seen: set[str] = set()
        if self.is_tree:
            stored = self.ledger.folder_digests(self.key)
            seen = self._tree(stored)
        else:
            self._single_file()
        self._send()
        while self.in_flight:
            self._record(self.in_flight.popleft())
        if self.superseded > SUPERSEDED_SHOWN:
            log.warning("... and %d more paid result(s) %s.", self.superseded - SUPERSEDED_SHOWN,
                        NOT_SAVED)
        self.stats.stopped = int(self.stopped)
        if self.is_tree:
            self.ledger.note_scan_cut(self.key, self.stopped)
        if self.is_tree and not self.stopped and not self.stats.found:
            self.stats.empty_roots.append(self.root)
        if self.is_tree and not self.stopped:
            self.ledger.note_unreadable(self.key, [
                ("" if folder == self.base else shown(os.path.relpath(folder, self.base)), why)
                for folder, why in self.stats.unreadable_folders])
            self.ledger.note_held(self.key, held_words(self.stats.held) if self.stats.held
                                  else None)
            clean = {d: v for d, v in self.changed.items() if v is not None}
            stale = [d for d in stored if d not in seen or self.changed.get(d, "") is None]
            if clean or stale:
                self.ledger.save_folder_digests(self.key, clean, stale)
        return self.stats

    def _single_file(self) -> None:
        path = self.root.path.resolve()
        st = path.stat()
        self.stats.found += 1
        out_rel = output_rel(self.root.out_prefix, "", DEFAULT_NAMING, path.name)
        refused = name_refused(self.out_dir, out_rel) if self.out_dir is not None else None
        known = self.ledger.known_files(self.key, "").get(path.name)
        found = ScannedFile(self.key, path.name, out_rel, st.st_size, st.st_mtime_ns, None,
                            self.options.fingerprint, refused)
        self._note_taken(found, str(path), known)
        self._consider(found, str(path), known)

    def _tree(self, stored: dict[str, tuple[str, int]]) -> set[str]:
        fresh = not stored and not self.ledger.has_files(self.key)
        seen: set[str] = set()
        below = _below(stored)
        for folder in folders(self.root, self.options, self.exclude,
                              self.stats.left_out, self.stats.unreadable_folders):
            if self.should_stop():
                self.stopped = True
                break
            seen.add(folder.rel_dir)
            # A source with nothing in it may be the mount point of a share not mounted: what
            # it held is not taken for gone. Below it, a folder emptied is one culled.
            bare_root = not (folder.rel_dir or folder.files or folder.subfolders)
            if not bare_root:
                self._forget_gone(folder, below.get(folder.rel_dir, set()))
            if not folder.files and (bare_root or folder.rel_dir not in stored):
                continue
            digest = folder.digest(self.root.out_prefix)
            last = stored.get(folder.rel_dir)
            if digest is not None and last is not None and last[0] == digest:
                self.stats.found += last[1]
                self.stats.unchanged += last[1]
                self._progress(last[1])
                continue
            if not self._look_into(folder, digest, fresh):
                break
        return seen

    def _look_into(self, folder: Folder, digest: str | None, fresh: bool) -> bool:
        """A folder new or changed since the last complete scan, file by file; False when a
        stop came in the middle of it."""
        images = folder.images()
        self.stats.found += len(images)
        known: dict[str, KnownFile] = {}
        if is_utf8(folder.rel_dir):  # else its files are rejected for their path
            self.changed[folder.rel_dir] = None if digest is None else (digest, len(images))
            if not fresh:
                known = self.ledger.known_files(self.key, folder.rel_dir)
        candidates = [_candidate(self.key, self.base, self.root, entry, folder.rel_dir,
                                 folder.settings, self.out_dir) for entry in images]
        if self.one_name_each and folder.settings.naming != DEFAULT_NAMING:
            candidates = _one_output_each(candidates, known)  # file names are unique
        if self.folded is not None:
            candidates = self._one_name_each(candidates, known)
        for candidate, entry in zip(candidates, images, strict=True):
            if self.should_stop():  # a folder of thousands of photos takes minutes
                self.stopped = True
                return False
            k = known.pop(candidate.rel_path, None)
            self._note_taken(candidate, entry.path, k)
            self._consider(candidate, entry.path, k)
        if known:  # what is left of them is gone from this folder
            self.ledger.forget_files(self.key, list(known))
        return True

    def _forget_gone(self, folder: Folder, recorded: set[str]) -> None:
        """The ledger forgets the photos under a subfolder a complete scan recorded and that
        is no longer one this folder's walk goes into (deleted, moved away, renamed, or
        passed over now), as it does a photo gone from its folder: their jobs are not sent,
        nor listed as needing a person, every night after."""
        for name in recorded.difference(folder.subfolders):
            self.ledger.forget_folder(self.key, f"{folder.rel_dir}/{name}" if folder.rel_dir
                                      else name)

    def _one_name_each(self, candidates: list[ScannedFile],
                       known: dict[str, KnownFile]) -> list[ScannedFile]:
        """On a disk that does not tell case apart, IMG_1.JPG and img_1.jpg, or Session/a.jpg
        and session/a.jpg, are one file: the first photo of such a name is sent, the others
        are not, as their results could not be saved. A photo the ledger has read keeps its
        name (it may be paid for). A result an earlier run saved under another case is found
        on the disk (:meth:`_note_taken`)."""
        assert self.folded is not None
        kept = []
        for c in candidates:
            k = known.get(c.rel_path)
            if c.problem is None:
                owner = self.folded.setdefault(c.out_rel.casefold(), c.rel_path)
                if owner != c.rel_path and (k is None or k.content_sha256 is None):
                    c = c._replace(problem=(
                        f"its output {c.out_rel} is the same file as the result of {owner} on "
                        "the disk of --out, which does not tell upper from lower case: not "
                        "sent, as its result could not be saved there (rename one of them, or "
                        "set on_collision to \"suffix\")"))
            kept.append(c)
        return kept

    def _note_taken(self, c: ScannedFile, path: str, k: KnownFile | None) -> None:
        """A file already at a new photo's output may keep its result from being saved there:
        noted here, decided once the photo is read (:meth:`_undeliverable`). Not asked of a
        file the ledger has read: it may have a paid job whose result a killed run saved
        before recording it; nor under "suffix", which gives each result a name."""
        if (c.problem is not None or self.out_dir is None or not self.one_name_each
                or (k is not None and k.content_sha256 is not None)):
            return
        taken = taken_by_another(self.out_dir, c.out_rel, Path(path),
                                 k.written_rel if k is not None else None)
        if taken is not None:
            self.taken[c.rel_path] = taken

    def _undeliverable(self, c: ScannedFile) -> str | None:
        """Why a photo just read is not sent: the file at its output (see :meth:`_note_taken`)
        is not its own result (a culled photo restored), and under "skip" could not be
        replaced, under "overwrite" is another photo's saved result, which its own would
        replace (on a disk blind to case, ``session/A.jpg`` lands on ``Session/a.jpg``)."""
        taken = self.taken.pop(c.rel_path, None)
        if taken is None or c.content_sha256 is None:
            return None
        found = sha256_file(taken) if taken.is_file() else None
        if found is not None and found == self.ledger.result_of(c.content_sha256, c.options_fp):
            return None
        if self.on_collision == "overwrite":
            if found is None or not self.ledger.is_output(found):
                return None  # a file skinbatch did not save: the user's to have replaced
            return (f"its output {taken} holds another photo's result, which this one's would "
                    "replace: not sent (rename one of them, give each its own naming, or set "
                    "on_collision to \"suffix\")")
        return (f"its output {taken} already exists and is not this photo's result (another "
                "photo's of the same name, or a file skinbatch did not save): not sent, as its "
                "result could not be saved there (move that file away, give each shoot its "
                "own --out or naming, or set on_collision to \"suffix\" or \"overwrite\")")

    def _consider(self, c: ScannedFile, path: str, k: KnownFile | None) -> None:
        if k is not None and k.job_id is not None:
            c = c._replace(linked=k.job_id)
        if (k is not None and c.problem is None and k.problem is None
                and k.size_bytes == c.size_bytes and k.mtime_ns == c.mtime_ns
                and k.content_sha256 is not None):
            self.stats.unchanged += 1
            if k.job_id is not None and k.options_fp == c.options_fp and k.out_rel == c.out_rel:
                self._progress(1)
                return
            if self._held(c, k.content_sha256, k):
                return
            c = c._replace(content_sha256=k.content_sha256)  # re-linked, not read again
        elif (self.settle and c.problem is None
              and not settled(path, c.mtime_ns, self.settle, time.time())):
            self.stats.deferred += 1
            self._spoil(c.rel_path)
            return
        self.batch.append((c, path))
        if len(self.batch) >= self.batch_size:
            self.batch_size = min(BATCH, self.batch_size * 2)
            self._send()

    def _held(self, c: ScannedFile, content_sha256: str, k: KnownFile) -> bool:
        """Whether a photo retouched and saved under other options is held back: not sent
        again unasked (a changed option in a nightly config would resend the archive, each
        photo's new result replacing the saved one), but with ``pay_again``, or when it has a
        result under these options too, or when every option was off for its result (a
        forgotten --smart-skin: that result is the photo, untouched). Its file keeps its job,
        and its folder is looked at again by each scan, until the options go back or the run
        pays again."""
        if (self.pay_again or k.job_state != JobState.DONE.value or k.options_fp == c.options_fp
                or k.options_fp is None or not Options.from_fingerprint(k.options_fp).enabled
                or self.ledger.result_of(content_sha256, c.options_fp) is not None):
            return False
        self.stats.held += 1
        self._spoil(c.rel_path)
        self._progress(1)
        return True

    def _send(self) -> None:
        """The current batch is complete: record the one before it (mostly hashed by now)."""
        if self.batch:
            paths = [path for c, path in self.batch
                     if c.problem is None and c.content_sha256 is None]
            # A small batch is spread over every worker, not read by one.
            chunk = max(1, min(HASH_CHUNK, len(paths) // self.workers))
            self.in_flight.append(_Batch(self.batch, [
                self.pool.submit(read_files, paths[start:start + chunk], self.prepare,
                                 self.ledger.image_identity, self.should_stop)
                for start in range(0, len(paths), chunk)]))
            self.batch = []
        while len(self.in_flight) > 1:
            self._record(self.in_flight.popleft())

    def _record(self, batch: _Batch) -> None:
        """Record the batch's files; one a stop kept from being read is left for the next
        scan, and the stop is noted so that no folder digest is trusted."""
        reads = {path: read for future in batch.reading for path, read in future.result().items()}
        rows = []
        for c, path in batch.files:
            if c.problem is None and c.content_sha256 is None:
                read = reads.get(path)
                if read is None:
                    self.stopped = True
                    continue
                if read.sha256 is None:
                    c = c._replace(problem=read.problem)
                else:
                    c = c._replace(content_sha256=read.sha256, size_bytes=read.size,
                                   mtime_ns=read.mtime_ns, born=None if read.rejected is None
                                   else Born(JobState.REJECTED, read.rejected))
                    self.stats.hashed += 1
                    if (why := self._undeliverable(c)) is not None:
                        c = c._replace(content_sha256=None, problem=why)
            if c.problem is not None:
                self.stats.problems += 1
                self._spoil(c.rel_path)
            rows.append(c)
        recorded = self.ledger.record_files(self._retouched_before(rows))
        self.stats.new_jobs += recorded.created
        self.stats.copied += recorded.copied
        self._say_superseded(recorded.superseded)
        self._progress(len(rows))

    def _retouched_before(self, rows: list[ScannedFile]) -> list[ScannedFile]:
        """Photos another output folder's ledger holds done under the same options: a new job
        for one starts done, its outputs copied from the result saved there (by
        :func:`batch.copies.materialize_copies`), or, that result gone, starts rejected; none
        is paid for again."""
        keys = [(c.content_sha256, c.options_fp) for c in rows
                if c.content_sha256 is not None and c.problem is None and c.born is None]
        if self.earlier is None or not keys:
            return rows
        found = self.earlier.results(keys)
        return [c._replace(born=e.born) if c.content_sha256 is not None and c.born is None and
                (e := found.get((c.content_sha256, c.options_fp))) is not None else c
                for c in rows]

    def _say_superseded(self, found: list[Superseded]) -> None:
        """A warning for each paid result a changed photo or option leaves unsaved, up to
        :data:`SUPERSEDED_SHOWN` a scan (options changed in a nightly config while a killed
        run's uploads were in flight would list them all); each job's history has its own."""
        for gone in found:
            self.superseded += 1
            if self.superseded > SUPERSEDED_SHOWN:
                continue
            log.warning("%s", f"{gone.path}: its options changed after it was sent: the result "
                        "paid for under the earlier ones is not saved; it is sent with these."
                        if gone.options else f"{gone.path} changed after it was sent (exported "
                        "again over itself?): the result paid for the earlier version is not "
                        "saved; the photo as it is now is sent.")

    def _spoil(self, rel_path: str) -> None:
        folder = rel_path.rpartition("/")[0]
        if folder in self.changed:
            self.changed[folder] = None

    def _progress(self, n: int) -> None:
        if self.on_progress:
            self.on_progress(n)
