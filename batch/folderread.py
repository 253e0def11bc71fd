"""Reading a folder the ledger has never seen into the rows it records, in a hashing worker.

A first scan records every file of the tree. The walk (on the scanner's thread) only lists a
new folder and hands its plain files' names over; the worker classifies the names, reads and
hashes each photo, takes its size, mtime and inode from the open file, stages the rows as the
ledger takes them (``StagedRows``) and makes the lines of the folder's digest (a big folder
comes in parts; the walk sums the digest up once all are back). The scanner's thread is left
with the ledger's inserts: they are most of a first scan's work and only one writer can make
them.

Imports nothing from the rest of the package but what the workers need, so they start fast.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from batch.names import IMAGE, name_kind, output_rel
from batch.scanrows import ScanRow, StagedRows

if TYPE_CHECKING:
    from batch.hashing import Hashed


class FolderDigest:
    """One digest of a folder's settings (``header``) and of every file's name, size, mtime
    and inode, or None when the folder must be looked at file by file anyway (a symlink, a
    file that cannot be stat-ed or read). Non-image files count too (a partial download
    renamed into place changes it), so no name needs classifying to skip an unchanged folder."""

    __slots__ = ("lines",)

    def __init__(self, header: str | None = None) -> None:
        """``header``: the folder's settings; a worker summing up part of a folder has none."""
        self.lines: list[str] | None = [] if header is None else [header]

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

    def add_path(self, name: str, path: str) -> None:
        """The file as ``add_entry`` would see it, from its path."""
        try:
            st = os.lstat(path)
        except OSError:
            self.lines = None
        else:
            self.add(name, st.st_size, st.st_mtime_ns, st.st_ino)

    def extend(self, lines: list[str] | None) -> None:
        """Another part's lines (None: a file there was not fine)."""
        if lines is None:
            self.lines = None
        elif self.lines is not None:
            self.lines.extend(lines)

    def value(self) -> str | None:
        if self.lines is None:
            return None
        self.lines.sort()  # the parts' lines come sorted: this only merges them
        data = "\n".join(self.lines).encode("utf-8", "surrogateescape")
        return hashlib.blake2b(data, digest_size=20).hexdigest()


class FolderJob(NamedTuple):
    """A new folder, or a part of a big one, as the walk hands it over."""

    path: str
    rel_dir: str
    #: Plain files directly in it (not symlinks, not special files, no line break in the
    #: name), dot-files left out: the walk looks at any other file itself.
    names: list[str]
    #: The source root (the ledger's ``files.root``) and the prefix of its outputs.
    root: str
    out_prefix: str
    naming: str
    options_fp: str
    #: Whether the folder gets a digest (not when the walk found a file it looks at itself).
    digest: bool


class FolderRead(NamedTuple):
    """What a reader made of a :class:`FolderJob` (its rows are staged with the others read
    in the same request: :class:`FoldersRead`)."""

    rel_dir: str
    #: Image-named files: each has a row.
    images: int
    hashed: int
    problems: int
    #: The files' lines of the folder's :class:`FolderDigest`, sorted (the walk sums up the
    #: digest once every part of the folder is back), or None: no digest for the folder.
    digest_lines: list[str] | None


class FoldersRead(NamedTuple):
    """The folders of one request, and the rows of all their image files."""

    staged: StagedRows
    folders: list[FolderRead]


def read_folders(jobs: Sequence[FolderJob],
                 hash_paths: Callable[[list[str]], list[Hashed]]) -> FoldersRead:
    """Read ``jobs``; ``hash_paths`` hashes a list of paths (one after the other in a worker
    process, spread over threads for a few big files)."""
    plans: list[tuple[FolderJob, list[str], FolderDigest | None]] = []
    paths: list[str] = []
    for job in jobs:
        digest = FolderDigest() if job.digest else None
        images: list[str] = []
        prefix = f"{job.path}/"
        for name in job.names:
            if name_kind(name) == IMAGE:
                images.append(name)
            elif digest is not None:
                digest.add_path(name, prefix + name)
        paths.extend([prefix + name for name in images])
        plans.append((job, images, digest))
    hashed = hash_paths(paths)
    reads: list[FolderRead] = []
    rows: list[ScanRow] = []
    start = 0
    for job, images, digest in plans:
        reads.append(_rows(job, images, digest, hashed[start:start + len(images)], rows))
        start += len(images)
    return FoldersRead(StagedRows.of(rows), reads)


def _rows(job: FolderJob, images: list[str], digest: FolderDigest | None,
          hashed: list[Hashed], rows: list[ScanRow]) -> FolderRead:
    """The folder's rows, added to ``rows``."""
    root, fp, rel_dir = job.root, job.options_fp, job.rel_dir
    read = problems = 0
    now = time.time()
    for name, (sha, problem, size, mtime_ns, inode) in zip(images, hashed, strict=True):
        rel = f"{rel_dir}/{name}" if rel_dir else name
        out_rel = output_rel(job.out_prefix, rel_dir, job.naming, name)
        if sha is None:
            problems += 1
            if digest is not None:
                digest.lines = None
        else:
            read += 1
            if digest is not None:
                digest.add(name, size, mtime_ns, inode)
        rows.append((root, rel, out_rel, size, mtime_ns, sha, fp, problem, now))
    lines = None if digest is None else digest.lines
    if lines is not None:
        lines.sort()
    return FolderRead(rel_dir, len(images), read, problems, lines)
