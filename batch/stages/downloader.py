"""Saving results: soonest-to-expire first, verified, written once to a temp file, renamed."""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import io
import logging
import os
import time
from datetime import datetime
from pathlib import Path

from PIL import Image
from sqlalchemy.exc import DBAPIError

from batch import crashpoints, metadata, thumbnails, transparency
from batch.api import ApiError, ErrorKind
from batch.ledger import JobRow, TransitionInfo
from batch.ledger.store import FileRow
from batch.outputs import (
    OutputConflict,
    copy_to_temp,
    name_refusal,
    out_folder_there,
    output_rel,
    place,
    refuses_name,
    remove_quietly,
    resolve_inside,
    write_temp,
)
from batch.preflight import Rejected, decoded
from batch.stages.runtime import (
    GONE_RECHECK,
    Runtime,
    SourceGone,
    StopReason,
    info_of,
    source_gone,
    wait_any,
)
from batch.states import JobState

log = logging.getLogger("batch.download")


def verify_result(data: bytes) -> tuple[str, Image.Image]:
    """The result's image format and its pixels (for its preview), after decoding it; raises
    if it is not an image."""
    try:
        inspection, pixels = decoded(data)
    except Rejected as exc:
        raise ApiError(ErrorKind.TRANSIENT, f"the downloaded result is not a valid image "
                                            f"({exc.reason})") from exc
    return inspection.format, pixels


def not_written(exc: OSError, out_dir: Path) -> str:
    """A write into --out that failed, named by the folder it failed in."""
    where = Path(exc.filename).parent if exc.filename else out_dir
    return (f"Cannot write to {where}: {exc.strerror or exc}. Nothing was marked done that is "
            "not on disk.")


class Downloader:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        #: No output may land inside a source folder (it would be scanned as a new photo).
        self._source_dirs = [p.resolve() for p in rt.config.sources if p.is_dir()]
        #: When a result was last saved, and since when and how often in this run each
        #: job's downloads have failed: a job that kept failing while others were saved has a
        #: problem of its own. The attempt limit counts this run's tries: one left at it by
        #: the run before must not stop this one at its first hitch.
        self.last_saved = 0.0
        self.failing: dict[int, tuple[float, int]] = {}
        #: The API did not answer either when a result reached the attempt limit: the line
        #: is down, and the run waits for it (said once until a result is saved).
        self.line_down = False
        #: A watch found its output folder gone: nothing is claimed until it is back.
        self.out_gone = False
        #: A watch's jobs whose source folder is gone, by that folder: not claimed until it
        #: is back (looked for every GONE_RECHECK seconds).
        self.parked: dict[int, str] = {}
        #: Temp files a drive dying right after a save would not let go: removed once the
        #: output folder is back, so that none stays in the client's delivery folder.
        self.leftovers: set[Path] = set()
        self._next_look = 0.0

    def _forget(self, job_id: int, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(job_id, None)
        self.rt.job_ended(task)
        self.rt.changed.set()  # the run may be over: let the driver look now

    async def run(self) -> None:
        rt = self.rt
        limit = max(2, rt.config.concurrency)
        root_map = rt.config.root_map
        while not rt.flags.abort:
            if self.out_gone and not out_folder_there(rt.out_dir):
                # A watch waits, whatever else stopped its uploads first: nothing to save into.
                await asyncio.sleep(GONE_RECHECK)
                continue
            if self.out_gone or ((self.parked or self.leftovers)
                                 and time.monotonic() > self._next_look):
                self._look_again()
            self.out_gone = False
            free = limit - len(self.in_flight)
            if free > 0:
                try:
                    claimed = rt.claimable([JobState.READY], free,
                                           exclude={*self.in_flight, *self.parked},
                                           soonest_expiry_first=True)
                    files = rt.ledger.files_of([job.id for job in claimed]) if claimed else {}
                except DBAPIError as error:
                    await rt.wait_for_ledger(error)
                    continue
                for job in claimed:
                    mine = root_map.localize(
                        [f for f in files.get(job.id, []) if rt.reaches(f.root)])
                    task = asyncio.create_task(self._download(job, mine),
                                               name=f"download-{job.id}")
                    self.in_flight[job.id] = task
                    task.add_done_callback(functools.partial(self._forget, job.id))
            await wait_any(rt.wake_downloader, set(self.in_flight.values()), 0.5)

    async def _download(self, job: JobRow, files: list[FileRow]) -> None:
        rt = self.rt
        if job.expires_at is not None and time.time() > job.expires_at - rt.config.expiry_margin:
            await rt.writes.transition(
                job.id, JobState.EXPIRED, expect=JobState.READY,
                info=TransitionInfo(message="the result link expired before it could be "
                                            "downloaded"))
            rt.expired()
            rt.changed.set()
            return
        temps: list[Path] = []
        try:
            # Within the try: a stop that lands while this move is committed moves it back.
            await rt.writes.transition(job.id, JobState.DOWNLOADING, expect=JobState.READY)
            await self._save(job, [f for f in files if f.problem is None], temps)
        except ApiError as error:
            await self._failed(job, files, error)
        except SourceGone as gone:
            await rt.writes.transition(job.id, JobState.READY, info=TransitionInfo(
                message=f"not saved yet: {gone.strerror}"))
            if not rt.watching:
                if not await rt.goes_on_without(gone.folder):
                    rt.fail_run(gone.stop_words())
            elif gone.folder not in self.parked.values():
                log.warning("Results of the photos in %s wait for it to come back (their "
                            "metadata comes from the photos).", gone.folder)
            self.parked[job.id] = gone.folder
        except OSError as exc:  # the disk is full, read-only, gone (a share), not ours...
            # A watch, which runs for days, waits for its output folder to come back; one
            # whose ledger went with it waits for both where the run is started (pipeline).
            await rt.writes.transition(job.id, JobState.READY, info=TransitionInfo(
                message=f"could not write the output: {exc.strerror or exc}"))
            # The folder decides, not the error's kind: a drive dying mid-write answers
            # ENOTCONN or EIO before the folder check can see it gone.
            if rt.watching and rt.ledger.gone() is None and not out_folder_there(rt.out_dir):
                self.out_gone = True
                rt.stop_submitting(StopReason.OUTPUT)
            else:
                rt.fail_run(not_written(exc, rt.out_dir))
        except asyncio.CancelledError:
            # Why an earlier try failed (a host not reached) stays what status says of it.
            kept = {"reason": job.reason, "error_code": job.error_code} if job.reason else {}
            await rt.writes.transition(job.id, JobState.READY, info=TransitionInfo(
                message="interrupted during download"), **kept)
            raise
        finally:
            self.leftovers.update(temp for temp in temps if not remove_quietly(temp))
        rt.changed.set()

    def _look_again(self) -> None:
        """What went away, looked for again: the source folders parked results wait for, and
        the output folder the leftover temp files are in."""
        self.parked = {job: folder for job, folder in self.parked.items()
                       if not os.path.isdir(folder)}
        if self.leftovers and out_folder_there(self.rt.out_dir):
            self.leftovers = {temp for temp in self.leftovers if not remove_quietly(temp)}
        self._next_look = time.monotonic() + GONE_RECHECK

    async def _save(self, job: JobRow, targets: list[FileRow], temps: list[Path]) -> None:
        rt = self.rt
        if not job.result_urls:
            raise ApiError(ErrorKind.PERMANENT, "the task completed without a result URL")
        if not out_folder_there(rt.out_dir):
            raise FileNotFoundError(errno.ENOENT, "the folder is gone (a drive unplugged, a "
                                    "share unmounted?); results paid for are kept")
        if (folder := source_gone(targets)) is not None:
            raise SourceGone(folder)
        # In memory: checking the result and putting the metadata on need it whole anyway,
        # and its final bytes then go to the disk once.
        received = io.BytesIO()
        downloaded = await rt.client.download(job.result_urls[0], received)
        # The scan beside may have found a photo changed, or its options, since the claim:
        # its file now waits for another job's result, which this one must not replace.
        if not (targets := await self._still_linked(job, targets)):
            await rt.writes.transition(job.id, JobState.READY, info=TransitionInfo(
                message="not saved: its photo or options changed while it was downloaded"))
            return
        # The disk work in one hop to a thread, not one per step: each hop costs a few
        # context switches, which added up to a good part of the client's CPU per image.
        outputs, problems, sha256 = await asyncio.to_thread(
            self._store, received.getvalue(), job, targets, temps, downloaded.sha256)
        await rt.writes.finish_download(job.id, sha256, outputs, problems)
        rt.progress.saved()
        if not rt.delivered:
            rt.delivered = True
            rt.wake_submitter.set()
        self.last_saved = time.monotonic()
        self.failing.pop(job.id, None)
        self.line_down = False
        rt.resume(StopReason.UNFETCHED, "A result came through")

    async def _still_linked(self, job: JobRow, targets: list[FileRow]) -> list[FileRow]:
        """Of ``targets``, the files still linked to ``job``; a shared ledger's database away
        is waited for, as the claims do (the job is this worker's meanwhile)."""
        while True:
            try:
                linked = self.rt.ledger.files_of([job.id]).get(job.id, [])
                return [t for t in targets if t.id in {f.id for f in linked}]
            except DBAPIError as error:
                await self.rt.wait_for_ledger(error)

    def _store(self, result: bytes, job: JobRow, targets: list[FileRow], temps: list[Path],
               downloaded_sha256: str
               ) -> tuple[dict[int, tuple[str, str | None]], dict[int, str], str]:
        """Check the downloaded bytes are an image; for each of the job's files, carry its own
        photo's metadata over (copies of one photo may differ in theirs: a web copy with its
        location taken out), write the final bytes to a temp file flushed to the disk and
        place the outputs; keep the report's previews of the pair. Returns the outputs, the
        names refused, and the SHA-256 of the first file's output (the job's result)."""
        crashpoints.reached("downloaded")
        fmt, pixels = verify_result(result)
        outputs: dict[int, tuple[str, str | None]] = {}
        problems: dict[int, str] = {}
        first: str | None = None
        for source, group in self._by_source(targets):
            photo = Path(group[0].root, group[0].rel_path)
            if source is None:
                log.warning("%s is gone: its result is saved without its metadata.", photo)
            dressed, dressed_fmt = result, fmt
            if (cutout := self._with_transparency(source, photo, result, fmt)) is not None:
                dressed, dressed_fmt = cutout
            if (carried := self._with_metadata(source, photo, dressed, dressed_fmt)) is not None:
                dressed = carried
            sha256 = (downloaded_sha256 if dressed is result
                      else hashlib.sha256(dressed).hexdigest())
            first = first or sha256
            temp = write_temp(dressed, (self.rt.out_dir / group[0].out_rel).parent,
                              Path(job.content_sha256).name)
            temps.append(temp)
            placed, refused = self._place_all(group, temp, temps, sha256, dressed_fmt)
            outputs.update(placed)
            problems.update(refused)
            if placed:
                if source is not None:
                    thumbnails.save(self.rt.out_dir, job.content_sha256, source)
                thumbnails.save_pixels(self.rt.out_dir, sha256, pixels)
        return outputs, problems, first or downloaded_sha256

    @staticmethod
    def _by_source(targets: list[FileRow]) -> list[tuple[bytes | None, list[FileRow]]]:
        """The files to save, grouped by their photo's bytes (byte-identical copies share one
        output's bytes), the first file's group first; a file that cannot be read joins the
        first group read (None: none can be read)."""
        found: list[tuple[bytes | None, list[FileRow]]] = []
        unread: list[FileRow] = []
        for target in targets:
            try:
                data = (Path(target.root) / target.rel_path).read_bytes()
            except OSError:
                unread.append(target)
                continue
            same = next((group for source, group in found if source == data), None)
            if same is None:
                found.append((data, [target]))
            else:
                same.append(target)
        if unread:
            if found:
                found[0][1].extend(unread)
            else:
                found.append((None, unread))
        return found

    def _with_transparency(self, source: bytes | None, photo: Path, result: bytes, fmt: str
                           ) -> tuple[bytes, str] | None:
        """The result of a cutout with its source's transparency, in a format that holds it
        (see ``batch.transparency``), or None to keep it as downloaded."""
        if source is None:
            return None
        try:
            return transparency.restored(source, result, fmt, self.rt.config.jpeg_quality)
        except Exception as exc:  # as the metadata: no fault in it costs the result
            log.warning("Could not put the transparency of %s back on its result: %s", photo,
                        exc)
            return None

    def _with_metadata(self, source: bytes | None, photo: Path, result: bytes, fmt: str
                       ) -> bytes | None:
        """The result with the source's EXIF/XMP/IPTC/ICC put on it (and scaled back up if
        asked), or None to keep it as downloaded. Deterministic, so a download redone after a
        crash gives the same bytes."""
        if source is None:
            return None
        try:
            carried = metadata.carry(source, result, fmt,
                                     upscale=self.rt.config.upscale_to_original,
                                     jpeg_quality=self.rt.config.jpeg_quality)
        except Exception as exc:  # the metadata is a courtesy: no fault in it costs the result
            log.warning("Could not copy the metadata of %s onto its result: %s", photo, exc)
            return None
        return None if carried == result else carried

    def _place_all(self, targets: list[FileRow], temp: Path, temps: list[Path], sha256: str,
                   fmt: str) -> tuple[dict[int, tuple[str, str | None]], dict[int, str]]:
        outputs: dict[int, tuple[str, str | None]] = {}
        problems: dict[int, str] = {}
        for index, target in enumerate(targets):
            rel = output_rel(target.out_rel, fmt, Path(target.root, target.rel_path))
            final: Path | None = None
            try:
                final = resolve_inside(self.rt.out_dir, rel)
                if any(final.is_relative_to(s) for s in self._source_dirs):
                    raise OutputConflict(f"the output path {final} lies inside a source folder; "
                                         "refused (choose another --out)")
                final.parent.mkdir(parents=True, exist_ok=True)
                source = temp if index == 0 else copy_to_temp(temp, final.parent, final.name)
                if source != temp:
                    temps.append(source)
                placed = place(source, final, sha256, target.written_sha256,
                               self.rt.config.on_collision)
                outputs[target.id] = (str(placed.relative_to(self.rt.out_dir)), sha256)
            except OutputConflict as conflict:
                problems[target.id] = str(conflict)
            except OSError as exc:  # one name the disk refuses must not stop the night
                if final is None or not refuses_name(exc, final.parent):
                    raise
                problems[target.id] = name_refusal(exc)
        return outputs, problems

    async def _failed(self, job: JobRow, files: list[FileRow], error: ApiError) -> None:
        """A paid result whose link lives is not given up for the host's sake: refused or
        failing, it is tried again; past the attempt limit, with no other result saved
        meanwhile, the run stops with it kept for the same command to save (a watch, which
        runs for days, goes on trying until its link's life ends; so does a run while the
        API is out of reach too, see :meth:`_api_answers`). It fails only for its own
        content, or for a limit it reached while other results were being saved. A refusal
        of a live link is the path (a proxy, a firewall), not the result: from the first one,
        as from the attempt limit, no new upload starts until a result comes through, since
        each would buy another result that cannot be fetched."""
        rt = self.rt
        attempts = job.attempts + 1
        # Saved before (a deleted output written again): nothing is at stake, nor paid again.
        # A link past its life never gets here: each try begins by asking its time.
        delivered = job.result_sha256 is not None
        since, tries = self.failing.get(job.id, (time.monotonic(), 0))
        tries += 1
        self.failing[job.id] = since, tries
        limit = tries >= rt.config.max_attempts
        if error.kind is ErrorKind.EXPIRED and delivered:
            await rt.writes.transition(job.id, JobState.EXPIRED, info=info_of(error),
                                       attempts=attempts)
            rt.expired()
        elif error.kind is ErrorKind.PERMANENT or (limit and (delivered or
                                                             self.last_saved > since)):
            message = error.describe() if error.kind is ErrorKind.PERMANENT else (
                f"download gave up after {tries} attempts: {error.describe()}")
            await rt.writes.transition(job.id, JobState.FAILED, attempts=attempts,
                                       info=TransitionInfo(http_status=error.http_status,
                                                           error_code=error.code,
                                                           message=message))
            rt.progress.dropped(uploaded=True)
        else:
            if error.kind is ErrorKind.EXPIRED or limit:
                rt.stop_submitting(StopReason.UNFETCHED)
            await rt.writes.transition(job.id, JobState.READY, attempts=attempts,
                                       next_attempt_at=time.time() + rt.backoff(attempts),
                                       info=info_of(error))
            if limit and not rt.watching:
                if error.kind is ErrorKind.UNREACHABLE and not await self._api_answers():
                    self._wait_for_the_line(job.id, since, error)
                elif self.line_down:
                    self._line_back()
                else:
                    rt.fail_run(self._kept(job, files, tries, error))
            return
        self.failing.pop(job.id, None)

    async def _api_answers(self) -> bool:
        """Whether a connection to the API can be made now. The result host alone out of reach
        is the path to it (a firewall, a DNS filter) and ends the run; both out of reach is
        the line, which a run waits out as its uploads do. An API that answers, even with an
        error, is reached: the line is up."""
        return await self.rt.balance_fails() is not ErrorKind.UNREACHABLE

    def _wait_for_the_line(self, job_id: int, since: float, error: ApiError) -> None:
        """Neither host answers: the result is tried on, with its count of tries begun again
        (the API is asked again at the limit), and no upload starts meanwhile."""
        self.failing[job_id] = since, 0
        if not self.line_down:
            self.line_down = True
            log.warning("Neither the result host nor the API answers (%s): the line seems "
                        "down; the results paid for are tried on until it is back.",
                        error.describe())

    def _line_back(self) -> None:
        """The API answers again after the line was down: every result gets its tries
        afresh. The result host may come back a moment after the API, or a try may have
        failed just before the line came back; a host that fails a whole round of tries
        from then on is the path to it, and the run stops."""
        self.line_down = False
        self.failing = {job: (time.monotonic(), 0) for job in self.failing}

    @staticmethod
    def _kept(job: JobRow, files: list[FileRow], attempts: int, error: ApiError) -> str:
        what = Path(files[0].root, files[0].rel_path) if files else f"job {job.id}"
        hint = (" (a proxy or firewall between this machine and the result host?)"
                if error.kind is ErrorKind.EXPIRED else "")
        until = "" if job.expires_at is None else \
            f" (this one's by {datetime.fromtimestamp(job.expires_at):%Y-%m-%d %H:%M})"
        return (f"The result of {what} could not be fetched in {attempts} attempts: "
                f"{error.describe()}{hint}; no other result was saved meanwhile. It is paid "
                f"for and kept, as are the others: run the same command again to save them "
                f"before their links expire{until}.")
