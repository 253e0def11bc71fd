"""A worker's cap on upload bandwidth (``--max-upload-rate``, as rclone's ``--bwlimit``): upload
bodies go out in chunks at ``rate`` bytes a second, so a studio's line stays usable during
business hours.

One body at a time has the line: the others wait, prepared, for their turn. Shared evenly,
every upload under way would finish at the same moment and the line would stand idle while
the next ones are prepared; one at a time, each finishes as soon as it can and the next is
ready when it does."""

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


class Turn:
    """One upload's hold on the line, given back once (when its body is sent, or when its
    request ends without sending it)."""

    def __init__(self, line: asyncio.Lock) -> None:
        self._line, self._held = line, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._line.release()


class UploadPace:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._line = asyncio.Lock()

    async def turn(self) -> Turn:
        """Wait for the line before the request goes out (a server would not wait for a
        body whose headers it has)."""
        await self._line.acquire()
        return Turn(self._line)

    async def stream(self, body: bytes, turn: Turn) -> AsyncIterator[bytes]:
        try:
            for start in range(0, len(body), CHUNK):
                chunk = body[start:start + CHUNK]
                now = time.monotonic()
                at = max(now, self._next)
                self._next = at + len(chunk) / self.rate
                if at > now:
                    await asyncio.sleep(at - now)
                yield chunk
        finally:
            turn.release()  # the next upload goes while this one waits for its answer
