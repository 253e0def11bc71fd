"""The shared pacer: under a 429 it learns the server's limit, and climbs back when it can."""

from __future__ import annotations

import asyncio
import time

import pytest

from batch.api import ratelimit
from batch.api.ratelimit import RateLimiter


def test_a_429_paces_under_what_the_server_took_and_quiet_brings_the_ceiling_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "RECOVERY_SECONDS", 0.2)

    async def scenario() -> list[float]:
        limiter = RateLimiter(100.0, burst=1)
        seen = []
        for _ in range(31):  # 30 taken, the 31st refused
            await limiter.acquire()
        limiter.rate_limited(0.05)
        seen.append(limiter.rate)  # one 429 takes at most half the pace
        started = time.monotonic()
        await limiter.acquire()
        seen.append(time.monotonic() - started)  # the Retry-After is waited out
        limiter.rate_limited(0.0)  # again: 31 taken in the last second, the 32nd refused
        seen.append(limiter.rate)
        await asyncio.sleep(0.25)  # quiet for longer than RECOVERY_SECONDS
        await limiter.acquire()
        seen.append(limiter.rate)
        return seen

    halved, waited, learned, recovered = asyncio.run(scenario())
    assert halved == 50.0
    assert waited >= 0.05
    assert learned == pytest.approx(31 * ratelimit.HEADROOM)
    assert recovered == pytest.approx(learned + ratelimit.RECOVERY_STEP * 100.0)
