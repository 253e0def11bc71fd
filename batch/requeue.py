"""What a person decides about the jobs listed as needing one: put back in line (the
``retry`` command) or accepted unretouched (``dismiss``); and what a run puts back itself: the
jobs whose file could not be read, once it reads again, and those whose uploads the API
failed, once."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from batch.api.errors import UPLOADS_FAILED
from batch.ledger import Ledger, open_ledger
from batch.ledger.store import Requeued
from batch.preflight import CHANGED, UNREADABLE
from batch.roots import RootMap
from batch.states import RETRYABLE, JobState

log = logging.getLogger("batch.requeue")


def requeue(ledger_location: str, states: Iterable[JobState],
            paths: Sequence[Path] = (), root_map: RootMap | None = None) -> Requeued:
    """Move the jobs in ``states`` (only those of the files at ``paths``, or in the folders
    there, when given) back in line; a run or watch working on the ledger meanwhile takes
    them at its next look (each move is compare-and-set: a job it moved meanwhile is left to
    it). A path under a tree ``root_map`` names is found under that name, as a shared ledger
    records it. A failed job whose result is paid for and whose link lives goes back
    to be downloaded; every other goes back to be sent. Resubmitting an ambiguous or expired
    job may pay for it again; the ledger counts it."""
    chosen = frozenset(states)
    if not chosen or not chosen <= RETRYABLE:
        raise ValueError(f"only {', '.join(sorted(RETRYABLE))} jobs can be put back in line")
    with contextlib.closing(open_ledger(ledger_location)) as ledger:
        return ledger.reset_jobs(chosen, "put back in line by skinbatch retry",
                                 _named(paths, root_map))


def dismiss(ledger_location: str, paths: Sequence[Path],
            root_map: RootMap | None = None) -> int:
    """Mark the failed and rejected jobs of the files at ``paths`` (or in the folders there)
    dismissed: accepted unretouched, no longer listed as needing a person, nor making a run
    exit 1 (a product shot the API finds no face in). Returns how many."""
    with contextlib.closing(open_ledger(ledger_location)) as ledger:
        return ledger.dismiss(_named(paths, root_map),
                              "dismissed by skinbatch dismiss: accepted unretouched")


def _named(paths: Sequence[Path], root_map: RootMap | None) -> list[str]:
    """``paths`` as the ledger names them: under a tree's name where ``root_map`` names it."""
    root_map = root_map or RootMap()
    return [root_map.key_for(str(p.resolve())) or str(p.resolve()) for p in paths]


def at_start(ledger: Ledger, root_map: RootMap) -> None:
    """What every run puts back in line at its start (and its dry run, on its copy, to count
    what the run would send): the photos that could not be read once they read, and those
    whose uploads the API failed, once."""
    read_again(ledger, root_map)
    try_again_given_up(ledger)


def read_again(ledger: Ledger, root_map: RootMap) -> int:
    """Put back in line the jobs rejected because their file could not be read (a share that
    went away, a permission) once one of their files on this machine reads: at each run's
    start and on each pass of a watch, which runs for days. A file that still cannot be read
    stays rejected with its reason rather than be claimed and refused again. The files of
    jobs rejected because they changed are left for the next scan to read as new. Returns how
    many jobs moved."""
    changed: dict[str, list[str]] = {}
    for row in ledger.files_rejected_for(CHANGED):
        changed.setdefault(row.root, []).append(row.rel_path)
    for root, rel_paths in changed.items():  # the next scan reads them as new files
        ledger.forget_files(root, rel_paths)
        ledger.save_folder_digests(root, {}, {rel.rpartition("/")[0] for rel in rel_paths})
        log.info("Reading again %d file(s) that changed since they were scanned.",
                 len(rel_paths))
    readable = [f"{row.root}/{row.rel_path}" for row in ledger.files_rejected_for(UNREADABLE)
                if any(_reads(Path(local.root, local.rel_path))
                       for local in root_map.localize([row]))]
    if not readable:
        return 0
    moved = ledger.reset_jobs([JobState.REJECTED], "read again: the file could not be read "
                              "before", readable, error_code=UNREADABLE).moved
    if moved:
        log.info("Reading again %d file(s) that could not be read before.", moved)
    return moved


def try_again_given_up(ledger: Ledger) -> int:
    """Put back in line, at a run's start, the jobs whose uploads the API failed up to the
    attempt limit in an earlier run (not charged): an outage of its backend behind a gateway
    that answers fails no photo for good. The submitter marks a job so only the first time,
    so a photo the API fails each time is left for a person once it has failed so twice.
    Returns how many jobs moved."""
    moved = ledger.reset_jobs([JobState.FAILED], "tried once more: its uploads failed at the "
                              "attempt limit in an earlier run", error_code=UPLOADS_FAILED).moved
    if moved:
        log.info("Trying once more %d photo(s) whose uploads the API failed at the attempt "
                 "limit in an earlier run.", moved)
    return moved


def _reads(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError:
        return False
    return True
