"""Uploads: preflight, commit ``submitting``, send, commit the answer at once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from batch import crashpoints, thumbnails
from batch.api import ApiError, ErrorKind
from batch.api.errors import UPLOADS_FAILED
from batch.ledger import JobRow, TransitionInfo
from batch.ledger.store import FileRow, StaleTransition
from batch.options import Options
from batch.outputs import MIN_FREE, out_folder_there, short_of_room
from batch.preflight import (
    CHANGED,
    COPIES_AT_ONCE,
    UNREADABLE,
    Prepared,
    PrepareSettings,
    Rejected,
    photo_key,
    preflight,
    reuse_pixel_memory,
)
from batch.stages.runtime import (
    UNPROVEN_UPLOADS,
    Answered,
    QueuedTask,
    Runtime,
    SourceGone,
    StopReason,
    info_of,
    source_gone,
    wait_any,
)
from batch.states import IN_FLIGHT, JobState, submittable

log = logging.getLogger("batch.submit")


#: Jobs claimed from the ledger per query, waiting for an upload slot (on a ledger one run
#: has to itself: on a shared one a worker takes only what it can start now, and leaves the
#: rest to the others).
PREFETCH = 64

#: Free space at which uploads stopped for a nearly full disk start again: well above where
#: they stopped, so that a disk hovering at the line does not start and stop them in turn.
ROOM_TO_RESUME = 2 * MIN_FREE


class PhotoGone(Exception):
    """None of a job's photos is there any more, their source folder still is: culled or
    moved away since the scan (a whole shoot moved to the archive). Their files are forgotten,
    as the next scan would forget them, and the job waits for one to come back."""

    def __init__(self, file_ids: list[int]) -> None:
        super().__init__(file_ids)
        self.file_ids = file_ids


def upload_name(job: JobRow, prepared: Prepared) -> str:
    """The file name the upload carries: from the content, never from the user's names."""
    return f"{job.content_sha256[:16]}.{prepared.format.lower().replace('jpeg', 'jpg')}"


class Submitter:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        #: The jobs of ``in_flight`` past the point of no return: their upload is recorded as
        #: begun (or about to be), so they may already be charged.
        self.committed: set[int] = set()
        #: Jobs this run has sent whose results are not yet in, while no result has been
        #: saved (see :data:`UNPROVEN_UPLOADS`).
        self.unproven: set[int] = set()
        self.said_unproven = False
        self.waiting: deque[tuple[JobRow, list[FileRow]]] = deque()
        self.states = submittable(rt.config.on_ambiguous, rt.config.on_expired)
        # Preparing a file (CPU) and sending it (the line, the API's pace) are bounded apart:
        # were the preparation inside the upload's slot, every slot would sometimes be
        # preparing with the line idle, and sometimes sending with the cores idle.
        self.preparing = asyncio.Semaphore(COPIES_AT_ONCE)
        reuse_pixel_memory(COPIES_AT_ONCE)
        self.sending = asyncio.Semaphore(rt.config.concurrency)
        #: Upload tasks at once: those sending, and up to COPIES_AT_ONCE more being prepared or
        #: waiting, prepared, for a slot.
        self.most = rt.config.concurrency + COPIES_AT_ONCE
        #: Where the results and the ledger go: no upload starts while one is short of room.
        self.folders = rt.config.written_folders

    def _forget(self, job_id: int, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(job_id, None)
        self.committed.discard(job_id)
        self.rt.job_ended(task)
        self.rt.changed.set()  # the run may be over: let the driver look now

    async def run(self) -> None:
        rt = self.rt
        while not rt.flags.abort:
            if rt.flags.submits_stopped is StopReason.DISK and short_of_room(
                    self.folders, ROOM_TO_RESUME) is None:  # made room: a watch runs for days
                rt.resume(StopReason.DISK, "The disk has room again")
            if rt.flags.submits_stopped is StopReason.OUTPUT and out_folder_there(rt.out_dir):
                rt.resume(StopReason.OUTPUT, "The output folder is back")
            if rt.flags.submits_stopped is not None:
                self._drop_unsent()
            free = self.most - len(self.in_flight)
            if free > 0 and not rt.delivered and rt.flags.submits_stopped is None:
                try:
                    free = min(free, self._before_a_result())
                except DBAPIError as error:
                    await rt.wait_for_ledger(error)
                    continue
            if free > 0 and rt.flags.submits_stopped is None:
                if len(self.waiting) < free:
                    try:
                        self._refill(free)
                    except DBAPIError as error:
                        await rt.wait_for_ledger(error)
                        continue
                while free > 0 and self.waiting:
                    job, files = self.waiting.popleft()
                    task = asyncio.create_task(self._submit(job, files),
                                               name=f"submit-{job.id}")
                    self.in_flight[job.id] = task
                    task.add_done_callback(functools.partial(self._forget, job.id))
                    free -= 1
            rt.uploads_waiting = len(self.waiting)
            await wait_any(rt.wake_submitter, set(self.in_flight.values()), 0.5)

    def _before_a_result(self) -> int:
        """Uploads that may start before this run has saved a result: what is left of
        :data:`UNPROVEN_UPLOADS` once the jobs sent, or about to be, whose results are still to
        come are counted (one that failed, or was never charged, no longer counts)."""
        unproven = self.unproven | set(self.in_flight)
        if len(unproven) < UNPROVEN_UPLOADS:
            return UNPROVEN_UPLOADS - len(unproven)
        states = self.rt.ledger.states_of(self.unproven - set(self.in_flight))
        self.unproven = {job for job in self.unproven
                         if job in self.in_flight or states.get(job) in IN_FLIGHT}
        left = UNPROVEN_UPLOADS - len(self.unproven | set(self.in_flight))
        if left <= 0 and not self.said_unproven:
            self.said_unproven = True
            log.info("%d photos sent; the rest wait for the first result to be saved, so that a "
                     "result host this network cannot reach costs no more.", UNPROVEN_UPLOADS)
        return left

    def _refill(self, free: int) -> None:
        """Claim the next jobs a few dozen at a time rather than one query per upload. They
        stay pending in the ledger until their upload starts (a compare-and-set transition),
        so a job that changed in between is simply skipped."""
        ledger = self.rt.ledger
        exclude = set(self.in_flight) | {job.id for job, _ in self.waiting}
        wanted = free if ledger.shared else max(free, PREFETCH)
        claimed = self.rt.claimable(self.states, wanted, exclude=exclude)
        files = ledger.files_of([job.id for job in claimed]) if claimed else {}
        local = self.rt.config.root_map.localize
        # A job whose files the scan forgot since the claim (their folder gone) waits for one.
        self.waiting.extend((job, local(files[job.id])) for job in claimed if files.get(job.id))

    def _drop_unsent(self) -> None:
        """Uploads have stopped (budget, clock, Ctrl-C, deadline): the ones still waiting for
        their turn (a pace, a breaker's cooldown that may last minutes, their file's
        preparation) will not be sent, so they end now rather than hold the run open. Those
        past the point of no return go on to their answer."""
        for job_id, task in self.in_flight.items():
            if job_id not in self.committed:
                task.cancel()

    async def drain(self, grace: float) -> None:
        """Let uploads under way get their answer (so they are not left ambiguous)."""
        self._drop_unsent()
        if self.in_flight:
            await asyncio.wait(set(self.in_flight.values()), timeout=grace)
        for task in list(self.in_flight.values()):
            task.cancel()
        if self.in_flight:
            await asyncio.wait(set(self.in_flight.values()), timeout=5)

    async def _submit(self, job: JobRow, files: list[FileRow]) -> None:
        rt = self.rt
        try:
            candidates = [f for f in files if f.problem is None]
            async with self.preparing:
                prepared, filename = await asyncio.to_thread(
                    self._prepare, job, candidates, rt.config.prepare, rt.out_dir,
                    functools.partial(photo_key, by_image=rt.ledger.image_identity))
        except SourceGone as gone:
            if rt.watching:  # read again by the watch once the folder is back
                await self._reject(job, files, Rejected(f"not read: {gone.strerror}",
                                                        UNREADABLE))
            elif await rt.goes_on_without(gone.folder):  # the job waits, pending
                rt.progress.dropped(uploaded=False)
            else:
                rt.fail_run(gone.stop_words())
            return
        except Rejected as rejected:
            await self._reject(job, files, rejected)
            return
        except PhotoGone as gone:  # the next scan would forget them: not the photo's fault
            await rt.writes.forget_files(gone.file_ids)
            rt.progress.dropped(uploaded=False)
            return
        async with self.sending:
            await self._send(job, prepared, filename)

    async def _reject(self, job: JobRow, files: list[FileRow], rejected: Rejected) -> None:
        # Said as it happens: a watch's summary comes only when it is stopped.
        log.info("Not sent: %s: %s", Path(files[0].root, files[0].rel_path) if files
                 else f"job {job.id}", rejected.reason)
        with contextlib.suppress(StaleTransition):
            await self.rt.writes.transition(job.id, JobState.REJECTED, expect=job.state,
                                            info=TransitionInfo(message=rejected.reason,
                                                                error_code=rejected.code))
            self.rt.progress.dropped(uploaded=False)
        self.rt.changed.set()

    def _may_start(self) -> bool:
        """Whether an upload the breaker and the pace let through may start now: no stop has
        come meanwhile, the disks have room for its result, the output folder is there, and
        the budget has a credit for it. If not, the breaker's admission is given back."""
        rt = self.rt
        if rt.flags.submits_stopped is not None:
            rt.breaker.release()
            return False
        if (short := short_of_room(self.folders)) is not None:
            rt.breaker.release()
            rt.stop_submitting(StopReason.DISK, f"{short}. What was paid for is still saved")
            return False
        if not out_folder_there(rt.out_dir):  # its result could not be saved now
            rt.breaker.release()
            if rt.watching:  # waits for it, as its downloads do
                rt.stop_submitting(StopReason.OUTPUT)
            else:
                rt.fail_run(f"Cannot write to the output folder {rt.out_dir}: it is gone (a "
                            "drive unplugged, a share unmounted?). Nothing more was sent; what "
                            "was paid for is kept for the same command to save.")
            return False
        if rt.budget is not None and not rt.budget.reserve():
            rt.breaker.release()
            rt.budget_spent()
            return False
        return True

    async def _send(self, job: JobRow, prepared: Prepared, filename: str) -> None:
        rt = self.rt
        await rt.before_upload()
        await rt.breaker.admit()
        await rt.client.limiter.acquire()
        if not self._may_start():
            return
        note = f" ({prepared.note})" if prepared.note else ""
        self.committed.add(job.id)
        if not rt.delivered:
            self.unproven.add(job.id)
        try:
            await rt.writes.transition(job.id, JobState.SUBMITTING, expect=job.state,
                                       prepared=prepared.note, stripped=prepared.stripped,
                                       info=TransitionInfo(message=f"uploading {filename}{note}"))
        except StaleTransition:
            log.debug("Job %d changed since it was claimed; not sent.", job.id)
            rt.breaker.release()
            if rt.budget is not None:
                rt.budget.settle(charged=False)
            return
        try:
            submitted = await rt.client.submit(prepared.payload, upload_name(job, prepared),
                                               prepared.content_type,
                                               Options.from_fingerprint(job.options_fp))
        except ApiError as error:
            if rt.budget is not None:
                rt.budget.settle(charged=error.kind is ErrorKind.AMBIGUOUS)
            if error.kind in (ErrorKind.TRANSIENT, ErrorKind.NOT_SENT, ErrorKind.UNREACHABLE,
                              ErrorKind.AMBIGUOUS):
                rt.breaker.failure(str(error))
            else:
                rt.breaker.success()
            await self._failed(job, error)
            return
        except asyncio.CancelledError:
            if rt.budget is not None:
                rt.budget.settle(charged=True)
            await rt.writes.transition(
                job.id, JobState.AMBIGUOUS, charge=True, error_code="AMBIGUOUS_SUBMIT",
                info=TransitionInfo(message="interrupted while waiting for the upload's answer: "
                                            "it may have been charged"))
            raise
        rt.breaker.success()
        if rt.budget is not None:
            rt.budget.settle(charged=True)
        crashpoints.reached("answered")
        now = time.time()
        task = QueuedTask(job.id, submitted.task_id, now, now + rt.config.result_ttl,
                          submitted.request_id, submitted.log_id)
        try:
            await rt.writes.transition(job.id, JobState.QUEUED, **task.move())
        except StaleTransition:  # this worker's lease lapsed meanwhile: the job is ambiguous
            log.error("Job %d was taken over by another worker before its upload's answer "
                      "(task %s, request %s) could be recorded.", job.id, submitted.task_id,
                      submitted.request_id)
            return
        except Exception:
            if rt.ledger.gone() is not None:  # paid for: not to be taken for a lost answer
                rt.unrecorded.append(Answered(task, job.content_sha256, job.options_fp))
            raise
        rt.progress.sent()
        rt.queued.put_nowait(task)
        rt.wake_poller.set()
        if rt.flags.given_up:
            rt.flags.given_up, rt.flags.uploads_back = False, True

    @staticmethod
    def _prepare(job: JobRow, candidates: list[FileRow], settings: PrepareSettings,
                 out_dir: Path, identity: Callable[[bytes], str]) -> tuple[Prepared, str]:
        """Read the job's bytes from any linked file that still is that photo (by the
        ledger's ``identity``); keep the report's preview of it, made from the pixels its check
        decoded."""
        changed = 0
        for f in candidates:
            path = Path(f.root) / f.rel_path
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                raise Rejected("permission denied: the file cannot be read",
                               UNREADABLE) from exc
            except OSError as exc:  # a dead share answers ENOTCONN or EIO
                if (folder := source_gone([f])) is not None:
                    raise SourceGone(folder) from exc
                raise Rejected(f"cannot read the file: {exc.strerror}", UNREADABLE) from exc
            if identity(data) != job.content_sha256:
                changed += 1
                continue
            prepared = preflight(data, settings)
            if prepared.pixels is not None:
                thumbnails.save_pixels(out_dir, job.content_sha256, prepared.pixels)
                prepared = replace(prepared, pixels=None)
            name = Path(f.rel_path).name
            if prepared.format == "JPEG" and prepared.note:
                name = str(Path(name).with_suffix(".jpg"))
            return prepared, name
        if changed:
            raise Rejected("the file changed after it was scanned; the next run reads it "
                           "again", CHANGED)
        if (folder := source_gone(candidates)) is not None:
            raise SourceGone(folder)
        if not candidates:
            raise Rejected("none of its files can be sent", UNREADABLE)
        raise PhotoGone([f.id for f in candidates])

    async def _api_down(self, error: ApiError) -> bool:
        """Whether an upload's failure at its attempt limit is the API's, not the photo's: the
        API fails a balance read too, as its gateway does in an outage
        that outlasts the attempts the breaker spaces out. The photo is then tried on, as
        through a night the line is down, rather than failed for a person to put back."""
        return error.kind in (ErrorKind.TRANSIENT, ErrorKind.NOT_SENT) and (
            await self.rt.balance_fails() in (ErrorKind.TRANSIENT, ErrorKind.UNREACHABLE))

    async def _failed(self, job: JobRow, error: ApiError) -> None:
        rt = self.rt
        info = info_of(error)
        attempts = job.attempts + 1
        if error.kind is ErrorKind.AMBIGUOUS:
            log.warning("Upload answer lost for job %s: %s", job.id, error.message)
            await rt.writes.transition(job.id, JobState.AMBIGUOUS, charge=True, attempts=attempts,
                                 error_code="AMBIGUOUS_SUBMIT",
                                 next_attempt_at=time.time() + rt.backoff(attempts), info=info)
        elif error.kind is ErrorKind.ACCOUNT:
            await rt.writes.transition(job.id, JobState.PENDING, info=info)
            rt.account_stop(error)
        elif error.kind is ErrorKind.PERMANENT:
            await rt.writes.transition(job.id, JobState.FAILED, attempts=attempts, info=info)
            rt.progress.dropped(uploaded=False)
        elif error.kind in (ErrorKind.RATE_LIMITED, ErrorKind.UNREACHABLE):
            # Not the upload's fault, so it keeps its attempts: a 429 has slowed the pace
            # already (finding an unknown limit means meeting it now and then), and while no
            # connection can be made (the line down all night) the breaker spaces the tries;
            # a photo must not end failed, for a person to put back, because the network was.
            delay = error.retry_after if error.retry_after is not None else rt.backoff(1)
            await rt.writes.transition(job.id, JobState.PENDING,
                                       next_attempt_at=time.time() + delay, info=info)
        elif attempts >= rt.config.max_attempts and not await self._api_down(error):
            # Marked for the next run's one more try (see batch.requeue.try_again_given_up)
            # the first time only: given up again, it is left for a person.
            first = not rt.ledger.failures_with(job.id, UPLOADS_FAILED)
            rt.flags.given_up |= first
            if not first:
                again = "given up in an earlier run too"
            elif rt.watching:  # batch.watch puts it back once an upload goes through again
                again = "tried once more when an upload goes through again, or by the next run"
            else:
                again = "the next run tries it once more"
            await rt.writes.transition(
                job.id, JobState.FAILED, attempts=attempts,
                info=TransitionInfo(http_status=error.http_status,
                                    error_code=UPLOADS_FAILED if first else error.code,
                                    request_id=error.request_id, log_id=error.log_id,
                                    message=f"gave up after {attempts} attempts ({again}): "
                                            f"{error.describe()}"))
            rt.progress.dropped(uploaded=False)
        else:
            delay = rt.backoff(attempts)
            if error.retry_after is not None:
                delay = max(delay, error.retry_after)
            await rt.writes.transition(job.id, JobState.PENDING, attempts=attempts,
                                 next_attempt_at=time.time() + delay, info=info)
        rt.changed.set()

