"""One run at a time per SQLite ledger: a second ``skinbatch run`` exits at once with a clear
message.

A PostgreSQL ledger takes no such lock: several runs there are workers that share the jobs
(see :mod:`batch.worker`), each claiming its own with row locks.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from batch.ledger import Ledger
from batch.ledger.engine import (
    NETWORK_FILESYSTEMS,
    LedgerUnavailable,
    filesystem_type,
    ledger_url,
)
from batch.names import STATE_DIR

log = logging.getLogger("batch.locking")
#: Ledger meta: the machines told that this SQLite ledger lies on a network share.
SHARE_TOLD = "network_share_told"


class LedgerBusy(RuntimeError):
    pass


class RunLock:
    """An OS file lock next to the ledger (or under --out for a SQLite database URL). The
    kernel drops it when the process dies, so a killed run never leaves a stale one."""

    def __init__(self, out_dir: Path, ledger_location: str) -> None:
        self._lock: FileLock | None = None
        if "://" in ledger_location:
            if not ledger_url(ledger_location).startswith("sqlite"):
                return
            digest = hashlib.sha256(ledger_location.encode()).hexdigest()[:16]
            self.path = out_dir / STATE_DIR / f"run-{digest}.lock"
        else:
            self.path = Path(ledger_location).expanduser().resolve().with_suffix(".lock")
        self._lock = FileLock(str(self.path), timeout=0)

    def __enter__(self) -> RunLock:
        if self._lock is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            raise LedgerBusy(f"Another skinbatch run is already working on this ledger (lock "
                             f"{self.path}). Wait for it to finish; this command sent and "
                             "changed nothing.") from None
        except OSError as exc:  # a folder not ours, a share whose server is down
            hint = ("this user may not write in that folder" if isinstance(exc, PermissionError)
                    else "is its drive or share there, and its server up?")
            raise LedgerUnavailable(f"cannot make the ledger's lock {self.path}: "
                                    f"{exc.strerror or exc} ({hint})") from None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._lock is not None:
            self._lock.release()


def tell_if_on_a_share(ledger: Ledger) -> None:
    """A SQLite ledger on a network share (a NAS's NFS or SMB export, the usual home of a
    studio's --out) serves one machine well, but the lock that keeps a second run off it may
    not hold across machines there: a second machine running on it could pay again and
    damage it. Said once to each machine that runs on it (a nightly cron mails every warning
    it prints), then a line of the log."""
    path = ledger.file
    if path is None or (kind := filesystem_type(path.parent)) not in NETWORK_FILESYSTEMS:
        return
    host = socket.gethostname()
    log.log(logging.INFO if ledger.told_before(SHARE_TOLD, [host]) else logging.WARNING,
            "The ledger %s is on a network share (%s): run skinbatch on it from one machine "
            "at a time, as the lock that keeps a second run off it may not hold across "
            "machines there; for several machines, use a PostgreSQL ledger (README, "
            "\"Several machines\").", path, kind)
