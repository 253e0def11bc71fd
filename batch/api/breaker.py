"""A circuit breaker for uploads: stop hammering a sick API.

After ``threshold`` consecutive transient failures (5xx, timeouts, lost answers) it opens: no
upload starts for ``cooldown`` seconds. Then one probe goes through (half-open); success closes it,
failure reopens it with the pause doubled, up to ``max_cooldown``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime

log = logging.getLogger("batch.breaker")


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown: float = 30.0, max_cooldown: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.failures = 0
        self.opened_until = 0.0
        self.cooldown = cooldown
        self.probing = False
        #: When the failures in a row began (wall clock), and the last one's words.
        self.failing_since = 0.0
        self.last_why = ""

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if self.clock() < self.opened_until else "half-open"

    def delay(self) -> float | None:
        """0.0 when a request may start now (claiming the probe when half-open); otherwise how
        long to wait; None while a probe is out and its outcome is awaited."""
        state = self.state
        if state == "closed":
            return 0.0
        if state == "open":
            return self.opened_until - self.clock()
        if self.probing:
            return None
        self.probing = True
        return 0.0

    async def admit(self) -> None:
        while True:
            delay = self.delay()
            if delay == 0.0:
                return
            await asyncio.sleep(0.05 if delay is None else min(delay, 1.0))

    def outage(self) -> str | None:
        """While it is open or probing, what has failed since when: the reason the photos
        left unsent at the end of a night are given, so that the morning reads "the API
        could not be reached", not only the deadline that ended the wait."""
        if self.failures < self.threshold:
            return None
        since = datetime.fromtimestamp(self.failing_since).strftime("%Y-%m-%d %H:%M")
        last = f" (the last: {self.last_why})" if self.last_why else ""
        return f"the API failed every try since {since}{last}"

    def release(self) -> None:
        """A claimed probe that was never sent."""
        self.probing = False

    def success(self) -> None:
        if self.failures >= self.threshold:
            log.info("The API answers again; uploads resume.")
        self.failures = 0
        self.probing = False
        self.cooldown = self.base_cooldown

    def failure(self, why: str = "") -> None:
        """One more failure in a row; ``why`` (the last failure's words) is said when the
        breaker opens, so that the log of an unattended night tells a network down from an
        API answering 503."""
        was_probe = self.probing
        self.probing = False
        if not self.failures:
            self.failing_since = time.time()
        self.failures += 1
        self.last_why = why
        if self.failures == self.threshold or (was_probe and self.failures > self.threshold):
            pause = self.cooldown
            if was_probe:
                self.cooldown = min(self.max_cooldown, self.cooldown * 2)
            self.opened_until = self.clock() + self.cooldown
            # Warned of until the pause is at its longest; after that, a probe every few
            # minutes of a night-long outage is told, not warned of: cron mails warnings, and
            # the run's end says how long the API failed.
            level = logging.INFO if was_probe and pause == self.cooldown else logging.WARNING
            log.log(level, "The API failed %d times in a row%s; pausing uploads for %.0f s.",
                    self.failures, f" (the last: {why})" if why else "", self.cooldown)
