"""A token bucket shared by every request to the API host, with a global pause for 429s."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.rate = rate
        self.capacity = float(burst if burst is not None else max(1, int(rate)))
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self._waiting = 0

    @property
    def saturated(self) -> bool:
        """Requests are queueing for tokens: the rate limit, not the work, sets the pace."""
        return self._waiting > 0

    def pause(self, seconds: float) -> None:
        """Hold every caller back for ``seconds`` (the server asked us to slow down)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        self._waiting += 1
        try:
            await self._take()
        finally:
            self._waiting -= 1

    async def _take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)
