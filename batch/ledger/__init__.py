"""The persistent job ledger: the queue every stage reads and writes."""

from batch.ledger.engine import LedgerUnavailable, open_ledger
from batch.ledger.store import (
    Born,
    JobRow,
    Ledger,
    LedgerGone,
    LedgerUnwritable,
    ScannedFile,
    TransitionInfo,
)

__all__ = ["Born", "JobRow", "Ledger", "LedgerGone", "LedgerUnavailable", "LedgerUnwritable",
           "ScannedFile", "TransitionInfo", "open_ledger"]
