"""One run at a time per ledger: a second ``skinbatch run`` exits at once with a clear message."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout


class LedgerBusy(RuntimeError):
    pass


class RunLock:
    """An OS file lock next to the ledger (or under --out for a database URL). The kernel
    releases it when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, out_dir: Path, ledger_location: str) -> None:
        if "://" in ledger_location:
            digest = hashlib.sha256(ledger_location.encode()).hexdigest()[:16]
            self.path = out_dir / ".skinbatch" / f"run-{digest}.lock"
        else:
            self.path = Path(ledger_location).expanduser().resolve().with_suffix(".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=0)

    def __enter__(self) -> RunLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise LedgerBusy(
                f"Another skinbatch run is already working on this ledger (lock {self.path}). "
                "Wait for it to finish; nothing was sent by this one.") from None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()
