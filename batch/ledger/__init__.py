"""The persistent job ledger: the queue every stage reads and writes."""

from batch.ledger.engine import LedgerUnavailable, open_ledger
from batch.ledger.store import (
    Born,
    JobRow,
    Ledger,
    LedgerFull,
    LedgerGone,
    ScannedFile,
    TransitionInfo,
)

__all__ = ["Born", "JobRow", "Ledger", "LedgerFull", "LedgerGone", "LedgerUnavailable",
           "ScannedFile", "TransitionInfo", "open_ledger"]
