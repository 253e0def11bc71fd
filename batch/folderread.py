"""Reading a folder the ledger has never seen into the rows it records, in a hashing worker.

A first scan records every file of the tree. The walk (on the scanner's thread) only lists a
new folder and hands its plain files' names over; the worker classifies the names, reads and
hashes each photo, takes its size, mtime and inode from the open file, builds the rows laid out
as the ledger takes them and sums up the folder's digest. The scanner's thread is left with the
ledger's inserts: they are most of a first scan's work and only one writer can make them.

Imports nothing from the rest of the package but what the workers need, so they start fast.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from batch.names import (
    DEFAULT_NAMING,
    IMAGE,
    LINE_BREAK_PROBLEM,
    has_line_break,
    name_kind,
    output_rel,
)
from batch.scanrows import ScanRow

if TYPE_CHECKING:
    from batch.hashing import Hashed


class FolderDigest:
    """One digest of a folder's settings (``header``) and of every file's name, size, mtime
    and inode, or None when the folder must be looked at file by file anyway (a symlink, a
    file that cannot be stat-ed or read). Non-image files count too (a partial download
    renamed into place changes it), so no name needs classifying to skip an unchanged folder."""

    __slots__ = ("lines",)

    def __init__(self, header: str) -> None:
        self.lines: list[str] | None = [header]

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

    def value(self) -> str | None:
        if self.lines is None:
            return None
        self.lines.sort()
        data = "\n".join(self.lines).encode("utf-8", "surrogateescape")
        return hashlib.blake2b(data, digest_size=20).hexdigest()


class FolderJob(NamedTuple):
    """A new folder, as the walk hands it over."""

    path: str
    rel_dir: str
    #: Every plain file directly in it (not a symlink, not a special file), dot-files left out.
    names: list[str]
    #: The source root (the ledger's ``files.root``) and the prefix of its outputs.
    root: str
    out_prefix: str
    naming: str
    options_fp: str
    #: The digest's first line (the folder's settings), or None: the folder gets no digest
    #: (the walk found a symlink or a special file in it and looks at those itself).
    digest_header: str | None
    #: False when ``names`` is one part of a big folder (its parts are read side by side):
    #: the reader then answers the digest's lines, for the walk to sum up.
    whole: bool = True


class FolderRead(NamedTuple):
    """What a reader made of a :class:`FolderJob`."""

    rel_dir: str
    rows: list[ScanRow]
    #: Image-named files: each has a row.
    images: int
    hashed: int
    problems: int
    #: None when the folder must be looked at file by file next time.
    digest: str | None
    #: For a part of a folder: its files' digest lines, or None as for ``digest``.
    digest_lines: list[str] | None = None


def read_folders(jobs: Sequence[FolderJob],
                 hash_paths: Callable[[list[str]], list[Hashed]]) -> list[FolderRead]:
    """Read ``jobs``; ``hash_paths`` hashes a list of paths (one after the other in a worker
    process, spread over threads for a few big files)."""
    plans: list[tuple[FolderJob, list[str], FolderDigest | None]] = []
    paths: list[str] = []
    for job in jobs:
        digest = None if job.digest_header is None else FolderDigest(job.digest_header)
        images: list[str] = []
        prefix = f"{job.path}/"
        for name in job.names:
            if name_kind(name) == IMAGE:
                images.append(name)
            elif digest is not None:
                digest.add_path(name, prefix + name)
        if not has_line_break(job.rel_dir):  # else nothing is read: each row says why
            paths.extend([prefix + name for name in images if not has_line_break(name)])
        plans.append((job, images, digest))
    hashed = iter(hash_paths(paths))
    return [_rows(job, images, digest, hashed) for job, images, digest in plans]


def _rows(job: FolderJob, images: list[str], digest: FolderDigest | None,
          hashed: Iterator[Hashed]) -> FolderRead:
    root, fp, rel_dir = job.root, job.options_fp, job.rel_dir
    plain_names = job.naming == DEFAULT_NAMING and not job.out_prefix
    bad_folder = has_line_break(rel_dir)
    rows: list[ScanRow] = []
    read = problems = 0
    now = time.time()
    for name in images:
        sha: str | None
        problem: str | None
        if bad_folder or has_line_break(name):
            sha, problem, size, mtime_ns, inode = None, LINE_BREAK_PROBLEM, 0, 0, 0
        else:
            sha, problem, size, mtime_ns, inode = next(hashed)
        rel = f"{rel_dir}/{name}" if rel_dir else name
        out_rel = rel if plain_names else output_rel(job.out_prefix, rel_dir, job.naming, name)
        if sha is None:
            problems += 1
            if digest is not None:
                digest.lines = None
        else:
            read += 1
            if digest is not None:
                digest.add(name, size, mtime_ns, inode)
        rows.append((root, rel, out_rel, size, mtime_ns, sha, fp, problem, now))
    if digest is None or digest.lines is None:
        return FolderRead(rel_dir, rows, len(images), read, problems, None)
    if job.whole:
        return FolderRead(rel_dir, rows, len(images), read, problems, digest.value())
    return FolderRead(rel_dir, rows, len(images), read, problems, None, digest.lines[1:])
