"""One pace for every request to the API host, found by asking.

The provider publishes no rate limit, so the client discovers it as TCP discovers what a path
carries (additive/multiplicative steps, a slow start):

- **Start** at the rate the last run learned (kept in the ledger), else at ``--max-qps`` when
  the user gave one, else at :data:`START`. ``--max-qps`` is only ever a ceiling.
- **Slow start**: until the first 429, while requests queue for tokens, the pace doubles every
  :data:`DOUBLE_EVERY` seconds.
- **A 429 shows the limit.** The first one ends the slow start, and :data:`STORM` of them in a
  second show a limit that fell: the pace drops to :data:`HEADROOM` of the requests the server
  took in the second before (those sent less those refused), yet one cut keeps
  :data:`DEEPEST_CUT` of a pace the server's answers set at least (:data:`UNTRIED_CUT` of an
  untried one), as a stall can bunch requests into one second of the server's. A lone 429 just
  after a probing step says the step went too far: the pace goes back to the step before,
  which passed. A lone one at a pace that has been passing says it touched the limit: a step
  (:data:`HEADROOM`) under it, unless the last second carried less than half the pace (a
  stray, which says nothing). One cut a second, as the 429s that follow a cut were sent at the
  old pace. A 429 while no request was waiting for the pace says nothing about it (the server
  is busy, or the key is shared): it cuts nothing.
- **Probing**: once :data:`SETTLE_REQUESTS` requests have passed since a cut, and then after
  each :data:`PROBE_REQUESTS` (or :data:`PROBE_SECONDS` worth) more, all without a 429 and with
  requests queueing, the pace rises by a step that starts at :data:`PROBE_FIRST` and triples
  with every step. A steady limit is touched once in about sixty requests. A step that passes
  the pace the last 429 came at shows the limit went up: the pace doubles again as in the slow
  start, so a raised limit is found within seconds.
- **Probes cost little**: a probe is the same requests at a slightly faster pace, and a 429
  refuses whichever request finds the server's window full (an upload as often as a status
  query), costing that request a retry and no credits.
- **The second after a cut**: the server counts requests over a second, and the last second
  may hold more of them than the new pace allows (the slow start's last doubling, a ceiling
  far above the limit). A request waits until fewer than the pace's count of requests were
  granted in the second before it, so sending resumes as fast as those leave the server's
  window: no blind pause, and no run of 429s into a full window.
- **Retry-After**: the refused request waits it out (its stage schedules the retry, as for any
  error); one longer than :data:`PAUSE_ABOVE` holds every request back, as an overloaded
  server asks.

Growth needs demand: a pace the last second did not fill at least half of proves nothing, so
it does not grow.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

#: Requests a second before anything is known.
START = 4.0
#: The pace never goes above this without a ceiling from the user, nor below FLOOR.
MAX_RATE = 1000.0
FLOOR = 0.2
#: After a 429, pace at this share of what the server took in the second before it.
HEADROOM = 0.95
DOUBLE_EVERY = 0.25
SETTLE_REQUESTS = 55
PROBE_FIRST = 0.05
PROBE_GROWTH = 3.0
PROBE_LAST = 1.5
PROBE_REQUESTS = 8
PROBE_SECONDS = 1.5
PAUSE_ABOVE = 2.0
#: This many 429s in a second show the limit even far below the pace.
STORM = 3
#: One cut leaves at least this share of a pace the server's answers set (a storm may come
#: of a stall, not a limit), and UNTRIED_CUT of one no request has tried yet.
DEEPEST_CUT = 0.5
UNTRIED_CUT = 0.25
#: The share of the pace the last second must have carried for it to count as tested.
FILLED = 0.5


class SharedBooking(Protocol):
    """The pace among the workers of a shared ledger: awaited for each request's moment, and
    told of each 429."""

    def __call__(self) -> Awaitable[None]: ...

    def refused(self) -> None: ...


@dataclass(frozen=True)
class Learned:
    """What a run found out: its last pace, and whether a 429 ever bounded it (if not, the
    pace only went as far as the run's demand took it, and the next run keeps growing it)."""

    rate: float
    limited: bool


class RateLimiter:
    def __init__(self, ceiling: float | None = None, *, learned: Learned | None = None,
                 burst: int = 1) -> None:
        self.ceiling = ceiling if ceiling is not None else MAX_RATE
        #: What the last run learned, kept for the next one while the ceiling holds this one
        #: under it (see :meth:`learned`).
        self._before = learned
        #: A 429 has set the pace in this run.
        self._cut = False
        if learned is not None:
            rate, self.limited = learned.rate, learned.limited
        elif ceiling is not None:  # the user says what the server takes: start there
            rate, self.limited = ceiling, True
        else:
            rate, self.limited = START, False
        self.rate = max(FLOOR, min(self.ceiling, rate))
        #: The pace of the last probing step that passed without a 429.
        self.proven = self.rate if self.limited else math.inf
        #: Doubling (no limit known, or the last one was passed) rather than probing.
        self.slow_start = not self.limited
        #: The pace at which the last 429 came (for a learned pace: just above it); infinite
        #: while no 429 has set the pace (the slow start's doubling, the user's ceiling).
        self._failed_at = self.rate / HEADROOM if learned and learned.limited else math.inf
        self.capacity = float(burst)
        # With no limit known, the run's first two requests (the balance, then the first
        # upload) go together rather than a quarter of a second apart at START; the slow
        # start meets any limit within its first second anyway.
        self._tokens = self.capacity + (0.0 if self.limited or ceiling is not None else 1.0)
        self._updated = time.monotonic()
        self._started = math.inf
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._granted: deque[float] = deque()
        self._refused: deque[float] = deque()
        self._changed_at = self._updated
        self._cut_at = -math.inf
        self._since_change = 0
        self._queued_since_change = False
        self._step = PROBE_FIRST
        #: Books each request among every worker of a shared ledger (see batch.worker).
        self.shared: SharedBooking | None = None

    @property
    def saturated(self) -> bool:
        """Requests are queueing for tokens: the rate limit, not the work, sets the pace."""
        return self._waiting > 0

    def learned(self) -> Learned:
        """What the next run starts from. A pace held at the user's ceiling, with no 429,
        shows that the ceiling passes and nothing of the server's limit: a daytime run under
        ``--max-qps 2`` must not leave tonight's run, without it, creeping up from 2 as
        from a limit the server showed. The pace learned before is kept if it was faster,
        else the ceiling is a pace to grow from."""
        if self._cut or self.rate < self.ceiling:
            return Learned(round(self.rate, 2), self.limited)
        if self._before is not None and self._before.rate > self.rate:
            return self._before
        return Learned(round(self.rate, 2), False)

    def pause(self, seconds: float) -> None:
        """Hold every caller back for ``seconds`` (the server asked everyone to wait)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def rate_limited(self, retry_after: float | None) -> None:
        """The server answered 429: pace under the limit it showed."""
        now = time.monotonic()
        if retry_after is not None and retry_after > PAUSE_ABOVE:
            self.pause(retry_after)
        self._refused.append(now)
        self._forget_before(now - 1.0)
        if self.shared is not None:
            self.shared.refused()
        if now - self._cut_at < 1.0:
            return
        accepted = max(0, len(self._granted) - len(self._refused))
        before = self.rate
        if not (self.saturated or self._queued_since_change):
            # Nobody was waiting for the pace: the 429 says nothing about it (the server is
            # busy, or the key is shared). The refused request waits; the pace stays.
            return
        storm = len(self._refused) >= STORM
        if not storm and self.proven < before:
            # The last probing step went too far: back to the one before, which passed.
            self.rate = max(self.proven, min(before, accepted) * HEADROOM)
        elif not storm and self.limited:
            if accepted < before / 2:
                # A stray 429 far below the pace that has been passing: not the limit (one
                # that really fell sends more of them within the second).
                return
            # The pace that has been passing touched the limit: a step under it. The count of
            # the last second is no better measure (at a few requests a second it is too
            # coarse to cut to: two of three is a third less).
            self.rate = max(FLOOR, before * HEADROOM)
        else:
            # The count of the last second is wrong after a stall (the server's, the
            # network's): requests sent over a longer time reach the server's window together,
            # and the rest of that second is refused, so it may say nothing got through. One
            # cut leaves at least DEEPEST_CUT of a pace the server's answers set, UNTRIED_CUT
            # of one nothing tried (the slow start's last doubling, the user's ceiling); a
            # limit that really fell shows a storm again a second later, and is cut again.
            tried = math.isfinite(self._failed_at)  # a 429 has been met: answers set it
            deepest = before * (DEEPEST_CUT if tried else UNTRIED_CUT)
            self.rate = max(FLOOR, deepest, min(before, accepted) * HEADROOM)
        self.proven = self.rate
        self.limited = self._cut = True
        self.slow_start = False
        self._failed_at = before
        self._cut_at = now
        self._step = PROBE_FIRST
        self._reset(now)
        self._since_change = -SETTLE_REQUESTS
        # Told, not warned of: finding the limit is the pace's work, a 429 costs a retry and no
        # credit, and a cron job's clean night is silent.
        log.info("The API answered 429 (too many requests) after %d in a second: pacing at "
                 "%.1f requests a second%s.", accepted, self.rate,
                 f" (--max-qps is {self.ceiling:g})" if self.ceiling < MAX_RATE else "")

    async def acquire(self) -> None:
        """Wait for a request's turn (here, then among the ledger's workers if shared)."""
        self._waiting += 1
        try:
            await self._take()
            if self.shared is not None:
                await self.shared()
        finally:
            self._waiting -= 1

    def rescale(self, workers_before: int, workers_now: int) -> None:
        """Workers sharing the key came or went: this one's pace becomes its new share."""
        self.rate = max(FLOOR, min(self.ceiling, self.rate * workers_before / workers_now))
        if self.limited:
            self.proven = self.rate

    def _forget_before(self, moment: float) -> None:
        for times in (self._granted, self._refused):
            while times and times[0] < moment:
                times.popleft()

    def _filled(self, now: float) -> bool:
        """The last second (or the time since the first request, if shorter) carried at
        least half the pace: the pace was put to the test."""
        span = min(1.0, now - self._started)
        return len(self._granted) >= FILLED * self.rate * span

    def _reset(self, now: float) -> None:
        self._changed_at = now
        self._since_change = 0
        self._queued_since_change = False

    def _grow(self, now: float) -> None:
        """More pace, where requests queued for it and no 429 came."""
        if not self._queued_since_change or self.rate >= self.ceiling or not self._filled(now):
            return
        if self.slow_start:
            if now - self._changed_at >= DOUBLE_EVERY:
                self.rate = min(self.ceiling, self.rate * 2)
                self._reset(now)
        elif self._since_change >= max(PROBE_REQUESTS, self.rate * PROBE_SECONDS):
            self.proven = max(self.proven, self.rate)
            # Past the pace the last 429 came at: the limit went up, so look for it as fast
            # as at the start.
            self.slow_start = self.proven > self._failed_at
            self.rate = min(self.ceiling, self.rate * (1 + self._step))
            self._step = min(PROBE_LAST, self._step * PROBE_GROWTH)
            self._reset(now)

    async def _take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                if self._tokens < self.capacity:
                    self._tokens = min(self.capacity,
                                       self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                self._forget_before(now - 1.0)
                if self._tokens >= 1.0 and len(self._granted) >= self.rate:
                    # The second before holds the pace's count already (a cut just came):
                    # the server's window has room when the oldest of them leaves it.
                    self._queued_since_change = True
                    await asyncio.sleep(self._granted[0] + 1.0 - now)
                    continue
                if self._tokens >= 1.0:
                    self._started = min(self._started, now)
                    self._tokens -= 1.0
                    self._granted.append(now)
                    self._since_change += 1
                    self._grow(now)
                    return
                self._queued_since_change = True
                await asyncio.sleep((1.0 - self._tokens) / self.rate)
