"""A worker's cap on upload bandwidth (``--max-upload-rate``, as rclone's ``--bwlimit``): every
upload's body goes out in chunks, each at the next free moment of one schedule shared by the
worker's uploads, so together they send at most ``rate`` bytes a second and a studio's line
stays usable during business hours."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

#: Bytes sent between two looks at the schedule.
CHUNK = 64 * 1024
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_rate(text: str) -> float:
    """``"800k"``, ``"5M"``, ``"1.5M"``, ``"250000"``: bytes a second (k, M, G are 1024-based,
    as rclone reads them)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?B)?(?:/s)?\s*", text)
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a rate such as 800k or 5M (bytes a second)")
    return float(found.group(1)) * _UNITS[found.group(2).lower()]


class UploadPace:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(body), CHUNK):
            chunk = body[start:start + CHUNK]
            now = time.monotonic()
            at = max(now, self._next)
            self._next = at + len(chunk) / self.rate
            if at > now:
                await asyncio.sleep(at - now)
            yield chunk
