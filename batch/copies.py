"""Outputs for files whose job is already done: a copy of a photo found later, an output the
user deleted, or a photo retouched before into another output folder (its result saved there,
see :mod:`batch.elsewhere`). Never pays: past its download link's life, an output moved or
deleted from --out (a studio moves deliveries to the client's folder) stays gone."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from batch import metadata
from batch.elsewhere import Elsewhere
from batch.ledger import JobRow, Ledger, TransitionInfo
from batch.ledger.store import FileRow
from batch.outputs import (
    OutputConflict,
    output_rel,
    place,
    remove_quietly,
    resolve_inside,
    sha256_file,
    write_temp,
)
from batch.states import JobState

log = logging.getLogger("batch.copies")


def materialize_copies(ledger: Ledger, out_dir: Path, expiry_margin: float,
                       reaches: Callable[[str], bool] = lambda _root: True,
                       earlier: Elsewhere | None = None) -> int:
    """Write the missing outputs of done jobs, copied from a verified sibling output; with
    none left, the job goes back to ``ready`` to be downloaded again while its link lives,
    and past that counts as expired. Returns how many outputs were written. Only files under
    roots the run ``reaches`` (on a shared ledger, another site's are that site's to write).
    ``earlier``: other output folders whose saved results may be copied too."""
    by_job: dict[int, list[int]] = {}
    needy = {f.id: f for f in ledger.files_needing_output() if reaches(f.root)}
    for f in needy.values():
        assert f.job_id is not None
        by_job.setdefault(f.job_id, []).append(f.id)
    written = gone = 0
    # One opening of each other ledger for all the jobs, not one per job.
    with earlier.kept_open() if earlier is not None else contextlib.nullcontext():
        for job_id, file_ids in by_job.items():
            job = ledger.job(job_id)
            source = _verified_sibling(ledger, out_dir, job)
            if source is None and earlier is not None and job.result_sha256 is not None:
                source = earlier.saved_result((job.content_sha256, job.options_fp),
                                              job.result_sha256)
            if source is None:
                if not (job.result_urls and job.expires_at is not None
                        and time.time() < job.expires_at - expiry_margin):
                    gone += len(file_ids)  # a photo paid for is not paid for again unasked
                    continue
                ledger.transition(job_id, JobState.READY, expect=JobState.DONE, info=TransitionInfo(
                    message="an output is missing and no saved copy is left"))
                continue
            fmt = source.suffix.lstrip(".").upper().replace("JPG", "JPEG")
            try:
                saved = source.read_bytes()
            except OSError:
                continue  # gone since it was verified: the next run looks again
            for file_id in file_ids:
                f = needy[file_id]
                rel = output_rel(f.out_rel, fmt, Path(f.root, f.rel_path))
                try:
                    final = resolve_inside(out_dir, rel)
                    data = _with_own_metadata(f, saved, fmt)
                    sha256 = hashlib.sha256(data).hexdigest()
                    temp = write_temp(data, final.parent, final.name)
                    try:
                        place(temp, final, sha256, f.written_sha256)
                    finally:
                        remove_quietly(temp)
                    ledger.set_file_output(f.id, written_rel=rel, written_sha256=sha256)
                    written += 1
                except OutputConflict as conflict:
                    ledger.set_file_output(f.id, written_rel=None, written_sha256=None,
                                           problem=str(conflict))
    if gone:
        log.info("%d output(s) of photos already retouched are gone from --out (moved or "
                 "deleted), with no saved copy or live download link left: they are not bought "
                 "again.", gone)
    return written


def _verified_sibling(ledger: Ledger, out_dir: Path, job: JobRow) -> Path | None:
    """An output of the job still as it was saved (each carries its own photo's metadata:
    :func:`_with_own_metadata` puts the copy's own in place of it)."""
    for f in ledger.files_for_job(job.id):
        if f.written_rel and f.written_sha256:
            path = out_dir / f.written_rel
            if path.is_file() and sha256_file(path) == f.written_sha256:
                return path
    return None


def _with_own_metadata(f: FileRow, saved: bytes, fmt: str) -> bytes:
    """A saved result, another photo's output, with ``f``'s own photo's metadata in place of
    that photo's (the same pixels, perhaps not the same names or place on them); as it is
    where ``f`` cannot be read."""
    try:
        photo = (Path(f.root) / f.rel_path).read_bytes()
        return metadata.carry(photo, saved, fmt)
    except OSError:
        return saved
    except Exception as exc:  # as for a download: no fault in the metadata costs the output
        log.warning("Could not copy the metadata of %s onto its output: %s",
                    Path(f.root, f.rel_path), exc)
        return saved
