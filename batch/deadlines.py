"""Parsing the times of --stop-submitting-at and --deadline: "07:30", "6h", "90m", ISO 8601."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An absolute local time for ``text``: a duration from now ("6h", "90m", "45s"), a clock
    time ("07:30": the next time the clock shows it), or an ISO 8601 date-time."""
    now = now or datetime.now().astimezone()
    match = DURATION.match(text)
    if match:
        return now + timedelta(seconds=float(match.group(1)) * UNITS[match.group(2).lower()])
    clock = re.fullmatch(r"\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*", text)
    if clock:
        hour, minute, second = int(clock.group(1)), int(clock.group(2)), int(clock.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"not a clock time: {text!r}")
        # On the wall clock, then placed in local time: the night the clocks change, 07:30
        # is 07:30 in the morning's offset, not the evening's.
        wall = now.astimezone().replace(tzinfo=None)
        when = wall.replace(hour=hour, minute=minute, second=second, microsecond=0)
        return (when if when > wall else when + timedelta(days=1)).astimezone()
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: use 07:30, 6h, 90m or "
                         "2026-11-25T07:30") from None
    return when if when.tzinfo else when.astimezone()
