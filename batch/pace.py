"""The API pace a ledger remembers, so tonight's run starts at the rate last night's found.

Kept per API host (a ledger moved from the emulator to the real API starts afresh); the key
is never stored.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from batch.api.ratelimit import START, Learned, RateLimiter
from batch.ledger import Ledger

log = logging.getLogger("batch.pace")
KEY = "api_pace"


def limiter_for(ledger: Ledger, api_base: str, ceiling: float | None,
                workers: int = 1) -> RateLimiter:
    """A limiter starting at this worker's share of the pace the ledger remembers."""
    saved = _load(ledger, api_base)
    learned = None if saved is None else Learned(saved.rate / workers, saved.limited)
    limiter = RateLimiter(ceiling, learned=learned)
    if learned is not None and limiter.rate < learned.rate:
        log.info("API pace: starting at %.1f requests a second (--max-qps); the last run "
                 "learned %.1f, kept for a run without it.", limiter.rate, learned.rate)
    elif saved is not None and (saved.limited or saved.rate > START):
        # (A run that never needed more than the starting pace learned nothing to tell.)
        log.info("API pace: starting at %.1f requests a second, as the last run learned%s.",
                 limiter.rate, "" if saved.limited else " (no limit seen yet: still growing)")
    return limiter


def remember(ledger: Ledger, api_base: str, limiter: RateLimiter, workers: int = 1) -> None:
    """What the workers found together: this one's pace times how many share the key."""
    learned = limiter.learned()
    ledger.set_meta(KEY, json.dumps({
        "api_base": api_base, "rate": learned.rate * workers, "limited": learned.limited,
        "at": datetime.now().astimezone().isoformat(timespec="seconds")}))


def _load(ledger: Ledger, api_base: str) -> Learned | None:
    try:
        saved = json.loads(ledger.get_meta(KEY) or "{}")
        if saved.get("api_base") != api_base:
            return None
        return Learned(float(saved["rate"]), bool(saved["limited"]))
    except (ValueError, KeyError, TypeError):
        return None
