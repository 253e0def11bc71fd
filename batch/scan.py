"""Finding the photos under the source folders and recording them in the ledger.

A re-scan is cheap: a file whose size and mtime match the ledger is not read again. Hashing
runs in threads (hashlib releases the GIL), so a first scan uses every core.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from batch.ledger.store import KnownFile, Ledger, ScannedFile
from batch.options import Options
from batch.presets import PRESET_NAME, FolderSettings, apply_preset

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic",
                            ".heif"})
TEMP_SUFFIXES = (".part", ".tmp", ".temp", ".crdownload", ".partial", ".download", "~")
HASH_CHUNK = 1024 * 1024
BATCH = 512


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


@dataclass(frozen=True, slots=True)
class Candidate:
    root: str
    rel_path: str
    out_rel: str
    abs_path: str
    size_bytes: int
    mtime_ns: int
    options_fp: str
    problem: str | None = None


def is_ignored_name(name: str) -> bool:
    """Hidden, temporary and partial files are never taken (until renamed)."""
    lower = name.lower()
    return (
        name.startswith(".")
        or name.startswith("~$")
        or lower.endswith(TEMP_SUFFIXES)
        or ".syncthing." in lower
    )


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def walk(root: SourceRoot, options: Options,
         exclude: tuple[Path, ...] = ()) -> Iterator[Candidate]:
    """Every image-named file under ``root``: not following directory symlinks, and following a
    file symlink only when its target stays inside the source. Problems come back as candidates
    with ``problem`` set, so they are recorded with a reason instead of vanishing. Each folder's
    ``.skinbatch.toml`` (if any) sets the options and naming for its subtree."""
    base = root.path.resolve()
    excluded = {str(p.resolve()) for p in exclude}
    top = FolderSettings(options)
    if base.is_file():
        st = base.stat()
        yield Candidate(str(base.parent), base.name, _join(root.out_prefix, base.name), str(base),
                        st.st_size, st.st_mtime_ns, options.fingerprint)
        return
    stack = [(str(base), "", top)]
    while stack:
        directory, rel_dir, settings = stack.pop()
        try:
            with os.scandir(directory) as entries:
                listing = list(entries)
        except OSError:
            continue
        if any(e.name == PRESET_NAME for e in listing):
            settings = apply_preset(settings, Path(directory) / PRESET_NAME)
        for entry in listing:
            name = entry.name
            if is_ignored_name(name):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.path not in excluded:
                        stack.append((entry.path, rel, settings))
                    continue
            except OSError:
                continue
            if not is_image_name(name):
                continue
            yield _candidate(base, root, entry, rel, rel_dir, settings)


def _candidate(base: Path, root: SourceRoot, entry: os.DirEntry[str], rel: str, rel_dir: str,
               settings: FolderSettings) -> Candidate:
    out_name = settings.output_name(entry.name)
    out_rel = _join(root.out_prefix, f"{rel_dir}/{out_name}" if rel_dir else out_name)
    fp = settings.options.fingerprint

    def problem(reason: str, size: int = 0, mtime: int = 0) -> Candidate:
        return Candidate(str(base), rel, out_rel, entry.path, size, mtime, fp, reason)

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
        st = entry.stat(follow_symlinks=True)
    except OSError as exc:
        return problem(f"cannot read file information: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return problem("not a regular file", 0, 0)
    return Candidate(str(base), rel, out_rel, entry.path, st.st_size, st.st_mtime_ns, fp)


def _hash_candidate(candidate: Candidate) -> ScannedFile:
    if candidate.problem is not None:
        return _scanned(candidate, None, candidate.problem)
    try:
        digest = sha256_file(candidate.abs_path)
    except FileNotFoundError:
        return _scanned(candidate, None, "the file disappeared while it was being scanned")
    except PermissionError:
        return _scanned(candidate, None, "permission denied: the file cannot be read")
    except OSError as exc:
        return _scanned(candidate, None, f"cannot read the file: {exc.strerror or exc}")
    return _scanned(candidate, digest, None)


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
    workers = workers or max(2, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        for root in roots:
            base = str(root.path.resolve() if root.path.is_dir() else root.path.resolve().parent)
            known = ledger.known_files(base)
            pending: list[Candidate] = []
            for candidate in walk(root, options, exclude):
                stats.found += 1
                pending.append(candidate)
                if len(pending) >= BATCH:
                    _flush(ledger, pool, pending, known, stats, settle)
                    if on_progress:
                        on_progress(len(pending))
                    pending = []
            if pending:
                _flush(ledger, pool, pending, known, stats, settle)
                if on_progress:
                    on_progress(len(pending))
    return stats


def _flush(
    ledger: Ledger,
    pool: ThreadPoolExecutor,
    batch: list[Candidate],
    known: dict[str, KnownFile],
    stats: ScanStats,
    settle: float = 0.0,
) -> None:
    to_hash: list[Candidate] = []
    now = time.time()
    relink: list[ScannedFile] = []
    for c in batch:
        k = known.get(c.rel_path)
        unchanged = (
            k is not None and c.problem is None and k.problem is None
            and k.size_bytes == c.size_bytes and k.mtime_ns == c.mtime_ns
            and k.content_sha256 is not None
        )
        if unchanged and k is not None:
            stats.unchanged += 1
            if k.job_id is None or k.options_fp != c.options_fp or k.out_rel != c.out_rel:
                relink.append(_scanned(c, k.content_sha256, None))
        elif settle and c.problem is None and not settled(c.abs_path, c.mtime_ns, settle, now):
            stats.deferred += 1
        else:
            to_hash.append(c)
    hashed = list(pool.map(_hash_candidate, to_hash))
    stats.hashed += sum(1 for f in hashed if f.content_sha256)
    stats.problems += sum(1 for f in hashed if f.problem)
    changed = hashed + relink
    if changed:
        stats.new_jobs += ledger.record_scan(changed)
