"""Deterministic crash injection for the crash-safety tests (the way SQLite tests itself).

``SKINBATCH_CRASH_AFTER=queued:3`` makes the process SIGKILL itself right after the third
transition into ``queued`` has been committed. Unset (always, in normal use) it costs nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_SPEC = os.environ.get("SKINBATCH_CRASH_AFTER", "")
_counts: Counter[str] = Counter()


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    return name, int(nth or "1")


_TARGET = _parse(_SPEC)


def reached(point: str) -> None:
    """Called after a named point (a committed transition's target state, or a stage event)."""
    if _TARGET is None or _TARGET[0] != point:
        return
    _counts[point] += 1
    if _counts[point] >= _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
