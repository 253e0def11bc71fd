"""A token bucket shared by every request to the API host, that learns the server's own limit.

The configured rate (``--max-qps``) is a ceiling, not a promise that the server takes that many.
When the server answers 429 it has just shown its limit: the requests it accepted in the second
before. The pace drops to just under that (``HEADROOM``; by at most half per 429, so one 429 in
a quiet second cannot stall the run) instead of running into the limit again after every
pause, and climbs back towards the ceiling while no 429 comes, in case the server was only
briefly overloaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

log = logging.getLogger(__name__)

#: After a 429, pace at this share of what the server accepted in the second before it.
HEADROOM = 0.95
#: While no 429 comes, every ``RECOVERY_SECONDS`` the pace climbs by ``RECOVERY_STEP`` of the
#: ceiling, back up to the ceiling.
RECOVERY_SECONDS = 30.0
RECOVERY_STEP = 0.1
#: The pace never drops below this many requests a second.
FLOOR = 0.2


class RateLimiter:
    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.ceiling = rate
        self.rate = rate
        self.capacity = float(burst if burst is not None else max(1, int(rate)))
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._granted: deque[float] = deque()
        self._settled_at = 0.0

    @property
    def saturated(self) -> bool:
        """Requests are queueing for tokens: the rate limit, not the work, sets the pace."""
        return self._waiting > 0

    def pause(self, seconds: float) -> None:
        """Hold every caller back for ``seconds`` (the server asked us to slow down)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def rate_limited(self, retry_after: float | None) -> None:
        """The server answered 429: wait as it asks, then pace under the limit it showed."""
        now = time.monotonic()
        self.pause(retry_after if retry_after is not None else 1.0)
        if self.rate <= 0:
            return
        self._forget_before(now - 1.0)
        # The refused request is among the ones granted in the last second.
        accepted = len(self._granted) - 1
        before = self.rate
        self.rate = max(FLOOR, before / 2, min(before, accepted * HEADROOM))
        self._settled_at = now
        if self.rate < before:
            log.warning("The API answered 429 (too many requests) after %d in a second: pacing "
                        "at %.1f requests a second from now on (--max-qps is %g).", accepted,
                        self.rate, self.ceiling)

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        self._waiting += 1
        try:
            await self._take()
        finally:
            self._waiting -= 1

    def _forget_before(self, moment: float) -> None:
        granted = self._granted
        while granted and granted[0] < moment:
            granted.popleft()

    def _recover(self, now: float) -> None:
        if self.rate < self.ceiling and now - self._settled_at >= RECOVERY_SECONDS:
            self.rate = min(self.ceiling, self.rate + RECOVERY_STEP * self.ceiling)
            self._settled_at = now

    async def _take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                self._recover(now)
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    self._granted.append(now)
                    self._forget_before(now - 1.0)
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)
