"""One scheduler polls every open task at the documented cadence, sharing the rate budget."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError

from batch import apispec
from batch.api import ApiError, ErrorKind
from batch.ledger import TransitionInfo
from batch.ledger.store import StaleTransition
from batch.stages.runtime import Runtime, StopReason, info_of, wait_any
from batch.states import OPEN, JobState

log = logging.getLogger("batch.poll")
RESYNC_SECONDS = 30.0
#: A window with room left by finished tasks is topped up from the ledger this often at most
#: (or every poll interval, if shorter).
REFILL_SECONDS = 2.0
#: While the clock is learning, first polls wait at most this many poll intervals.
WARMUP_CAP = 4.0


class TaskClock:
    """Learns how long tasks take, so a task's first status query lands near its likely
    completion instead of every poll interval from the start: fewer queries for the same
    results, and never more often than the documented cadence.

    It keeps, for recent tasks, the time (since submit) of the poll that found them complete
    (an upper bound on their duration) and starts polling at a quantile of those: the
    ``quantile`` when requests flow freely (results sooner), the higher ``busy_quantile`` when
    the rate limit sets the pace (then a query that finds the task unfinished takes a token an
    upload needed). The time is when that poll was due, not when it went out: a poll that
    waited for the rate limit must not teach the clock that tasks take longer, or first polls
    drift later and later behind the results.
    """

    def __init__(self, minimum: float, window: int = 200, quantile: float = 0.8,
                 busy_quantile: float = 0.95, warmup: int = 10) -> None:
        self.minimum = minimum
        self.window, self.warmup = window, warmup
        self.quantile, self.busy_quantile = quantile, busy_quantile
        self.seen: list[float] = []
        #: Before any estimate: the oldest age at which a task was still unfinished.
        self.unfinished = 0.0

    def observe(self, seconds: float) -> None:
        self.seen.append(seconds)
        if len(self.seen) > self.window:
            del self.seen[: len(self.seen) - self.window]

    def observe_unfinished(self, seconds: float) -> None:
        self.unfinished = max(self.unfinished, seconds)

    def first_poll_after(self, busy: bool = False) -> float:
        if len(self.seen) < self.warmup:
            # While learning: not before the tasks seen so far were still running (a slow
            # one moves it only so far), and, when the rate limit sets the pace anyway, as
            # late as that allows: the first few tasks must not each cost several queries.
            cap = WARMUP_CAP * self.minimum
            return cap if busy else max(self.minimum, min(self.unfinished, cap))
        ordered = sorted(self.seen)
        quantile = self.busy_quantile if busy else self.quantile
        return max(self.minimum, ordered[min(len(ordered) - 1, int(len(ordered) * quantile))])


@dataclass(slots=True)
class Tracked:
    task_id: str
    state: JobState
    expires_at: float
    submitted_at: float
    attempts: int = 0
    #: When the next query was scheduled for.
    due: float = 0.0


class Poller:
    """Keeps at most ``poll_window`` open tasks in memory; the rest wait in the ledger and come
    in oldest first as finished ones leave room, so memory stays flat however many tasks are
    open (no rate limit polls that many at the documented cadence anyway)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.window = rt.config.poll_window
        self.tracked: dict[int, Tracked] = {}
        self.heap: list[tuple[float, int]] = []
        self.in_flight: set[asyncio.Task[None]] = set()
        self._last_sync = 0.0
        self._takeovers = 0
        #: Some open task is in the ledger only (the window was full when it came).
        self._left_out = False
        self.clock = TaskClock(rt.config.poll_interval)
        #: When the API last answered for a task (wall clock, as tasks' upload times).
        self.answered_at = 0.0

    def _track(self, job_id: int, task_id: str, state: JobState, submitted_at: float,
               expires_at: float) -> None:
        if job_id in self.tracked:
            return
        if len(self.tracked) >= self.window:
            self._left_out = True
            return
        # Uploads still to come queue for the same tokens: a query spent too early delays one.
        busy = self.rt.client.limiter.saturated and self.rt.uploads_waiting > 0
        first = max(submitted_at + self.clock.first_poll_after(busy), time.time())
        self.tracked[job_id] = Tracked(task_id, state, expires_at, submitted_at, due=first)
        heapq.heappush(self.heap, (first, job_id))

    def _take_handoffs(self) -> None:
        while not self.rt.queued.empty():
            task = self.rt.queued.get_nowait()
            self._track(task.job_id, task.task_id, JobState.QUEUED, task.submitted_at,
                        task.expires_at)

    def _sync(self) -> None:
        """Pick up open tasks from the ledger, oldest first, until the window is full (at
        start, then now and then, and soon after finished tasks left room)."""
        now = time.time()
        self._last_sync, self._left_out = now, False
        self._takeovers = self.rt.takeovers
        for job_id, task_id, state, submitted_at, expires_at in self.rt.ledger.open_tasks(
                OPEN, owner=self.rt.worker):
            self._track(job_id, task_id, state, submitted_at or now,
                        expires_at or now + apispec.RESULT_TTL_SECONDS)
            if self._left_out:
                return

    def _sync_due(self) -> bool:
        since = time.time() - self._last_sync
        room = len(self.tracked) < self.window * 0.9
        refill = min(REFILL_SECONDS, self.rt.config.poll_interval)
        return (not self._last_sync or since > RESYNC_SECONDS
                or self._takeovers != self.rt.takeovers
                or (self._left_out and room and since > refill))

    async def run(self) -> None:
        rt = self.rt
        limit = max(2, rt.config.concurrency * 2)
        while not rt.flags.abort:
            if self._sync_due():
                try:
                    self._sync()
                except DBAPIError as error:
                    await rt.wait_for_ledger(error)
                    continue
            now = time.time()
            while self.heap and self.heap[0][0] <= now and len(self.in_flight) < limit:
                _, job_id = heapq.heappop(self.heap)
                if job_id in self.tracked:
                    task = asyncio.create_task(self._poll(job_id), name=f"poll-{job_id}")
                    self.in_flight.add(task)
                    task.add_done_callback(self._forget)
            timeout = (self.heap[0][0] - now) if self.heap else 1.0
            if len(self.in_flight) >= limit:
                timeout = 1.0
            await wait_any(rt.wake_poller, self.in_flight, min(timeout, 1.0))
            self._take_handoffs()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.rt.job_ended(task)
        self.rt.changed.set()

    def _again(self, job_id: int, delay: float) -> None:
        due = time.time() + delay
        if (item := self.tracked.get(job_id)) is not None:
            item.due = due
        heapq.heappush(self.heap, (due, job_id))

    async def _poll(self, job_id: int) -> None:
        rt, item = self.rt, self.tracked[job_id]
        interval = rt.config.poll_interval
        try:
            if time.time() > item.expires_at - rt.config.expiry_margin:
                await self._move(job_id, JobState.EXPIRED, TransitionInfo(
                    message="the task did not finish before its result would expire"))
                rt.expired()
                return
            await rt.client.limiter.acquire()
            try:
                status = await rt.client.query(item.task_id)
            except ApiError as error:
                await self._error(job_id, item, error)
                return
            self.answered_at = time.time()
            rt.resume(StopReason.LOST, "The API answers for its tasks again")
            if status.status == apispec.TASK_COMPLETED:
                self.clock.observe(item.due - item.submitted_at)
                await self._move(job_id, JobState.READY, TransitionInfo(
                    http_status=200, request_id=status.request_id, log_id=status.log_id),
                    result_urls=status.result_urls, attempts=0, next_attempt_at=0.0)
                rt.wake_downloader.set()
                return
            if status.status == apispec.TASK_PROCESSING and item.state is JobState.QUEUED:
                await self._move(job_id, JobState.PROCESSING, TransitionInfo(http_status=200),
                                 keep=True)
                item.state = JobState.PROCESSING
            item.attempts = 0
            self.clock.observe_unfinished(item.due - item.submitted_at)
            self._again(job_id, interval)
        except StaleTransition:
            self.tracked.pop(job_id, None)

    async def _move(self, job_id: int, target: JobState, info: TransitionInfo,
                    keep: bool = False, **fields: Any) -> None:
        item = self.tracked[job_id]
        try:
            await self.rt.writes.transition(job_id, target, expect=item.state, info=info,
                                            **fields)
        finally:
            if not keep:
                self.tracked.pop(job_id, None)
        self.rt.changed.set()

    async def _error(self, job_id: int, item: Tracked, error: ApiError) -> None:
        rt = self.rt
        if error.kind is ErrorKind.ACCOUNT:
            rt.account_stop(error)
            self._again(job_id, rt.config.poll_interval)
            return
        if error.kind is ErrorKind.PERMANENT:
            await self._move(job_id, JobState.FAILED, info_of(error))
            rt.progress.dropped(uploaded=True)
            return
        if error.kind is ErrorKind.EXPIRED:  # a lost task: resubmitted or reported, as on_expired
            if self.answered_at < item.submitted_at:
                # Nothing answered since it was sent: the API, or a gateway in front of it,
                # may be losing every task, and each upload would buy another lost one.
                rt.stop_submitting(StopReason.LOST)
            await self._move(job_id, JobState.EXPIRED, info_of(error))
            rt.expired()
            return
        if error.kind is ErrorKind.RATE_LIMITED:
            # The pace has slowed for it already: ask again as the server says, without the
            # backoff of a failing request (an unknown limit is met now and then).
            self._again(job_id, max(rt.config.poll_interval, error.retry_after or 0.0))
            return
        item.attempts += 1
        await rt.writes.note_attempt(job_id, info_of(error), attempts=item.attempts,
                                     next_attempt_at=0.0)
        delay = max(rt.config.poll_interval, rt.backoff(item.attempts))
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        self._again(job_id, delay)
