"""One run at a time per ledger: a second ``skinbatch run`` exits at once with a clear message.

A file lock covers one machine. A PostgreSQL ledger can be reached from several machines, each
with its own ``--out``: there the lock is also taken in the database itself (an advisory lock
held by a connection of the run's), so a run started elsewhere cannot "recover" this one's
uploads under way as interrupted ones (which would make them ambiguous and maybe paid twice).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

from batch.ledger.engine import ledger_url

#: The advisory lock's key: one run per PostgreSQL database holding a ledger.
ADVISORY_KEY = int.from_bytes(hashlib.sha256(b"skinbatch run").digest()[:8], "big",
                              signed=True)


class LedgerBusy(RuntimeError):
    pass


def _busy(where: str) -> LedgerBusy:
    return LedgerBusy(f"Another skinbatch run is already working on this ledger ({where}). "
                      "Wait for it to finish; nothing was sent by this one.")


class RunLock:
    """An OS file lock next to the ledger (or under --out for a database URL), and for a
    PostgreSQL ledger an advisory lock in the database. Both go when the process dies (the
    kernel drops the file lock, the server the session's lock), so a killed run never leaves a
    stale one."""

    def __init__(self, out_dir: Path, ledger_location: str) -> None:
        self._url: str | None = None
        if "://" in ledger_location:
            digest = hashlib.sha256(ledger_location.encode()).hexdigest()[:16]
            self.path = out_dir / ".skinbatch" / f"run-{digest}.lock"
            url = ledger_url(ledger_location)
            if url.startswith("postgresql"):
                self._url = url
        else:
            self.path = Path(ledger_location).expanduser().resolve().with_suffix(".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=0)
        self._engine: Engine | None = None
        self._held: Connection | None = None

    def __enter__(self) -> RunLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise _busy(f"lock {self.path}") from None
        if self._url is not None:
            try:
                self._lock_database(self._url)
            except BaseException:
                self._release_database()
                self._lock.release()
                raise
        return self

    def _lock_database(self, url: str) -> None:
        self._engine = create_engine(url, poolclass=NullPool)
        self._held = self._engine.connect()
        taken = self._held.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                   {"key": ADVISORY_KEY}).scalar()
        self._held.commit()  # the lock is the session's: it outlives the transaction
        if not taken:
            raise _busy("a run on another machine, or with another --out, holds its lock in "
                        "the database")

    def _release_database(self) -> None:
        if self._held is not None:
            self._held.close()  # the session ends, and with it the advisory lock
            self._held = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._release_database()
        self._lock.release()
