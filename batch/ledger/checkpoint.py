"""Checkpointing a SQLite ledger's WAL in the background while a scan writes in bulk.

A checkpoint copies the pages the WAL holds into the database file and flushes both to disk.
Run by a commit (SQLite's autocheckpoint), it stalls the committing thread on that flush: in
a first scan that is the one thread making the ledger's inserts, stalled 90-150 ms at a time
here, far longer on a spinning disk. While bulk writes go on, a thread of its own checkpoints
instead, each time the WAL has grown by ``every_bytes``: PASSIVE, so it never waits for the
writer, which appends on meanwhile. The autocheckpoint stays, at a higher bound
(``driver.BULK_WAL``), as the limit on the WAL's size should this thread fall behind.
"""

from __future__ import annotations

import logging
import os
import threading

from sqlalchemy import Engine

log = logging.getLogger(__name__)


class BackgroundCheckpoint:
    """Checkpoints of one SQLite ledger, started by :meth:`after_bulk_commit`."""

    def __init__(self, engine: Engine, every_bytes: int) -> None:
        database = engine.url.database
        self._engine = engine
        self._wal = f"{database}-wal" if database else None
        self._every = every_bytes
        self._last = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def after_bulk_commit(self) -> None:
        """Start a checkpoint if the WAL has grown by ``every_bytes`` since the last one
        started, and none is running. (The WAL's file shrinks only when it is reused after a
        checkpoint and cut back; it is then measured from there.)"""
        if self._wal is None:
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            try:
                size = os.stat(self._wal).st_size
            except OSError:
                return
            if size < self._last:
                self._last = 0
            if size - self._last < self._every:
                return
            self._last = size
            self._thread = threading.Thread(target=self._checkpoint,
                                            name="ledger-checkpoint", daemon=True)
            self._thread.start()

    def _checkpoint(self) -> None:
        try:
            connection = self._engine.raw_connection()
            try:
                cursor = connection.cursor()
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                cursor.fetchall()
                cursor.close()
            finally:
                connection.close()
        except Exception as exc:  # the next commit's autocheckpoint does it instead
            log.debug("A background checkpoint of the ledger failed: %s", exc)

    def close(self) -> None:
        """Wait for a checkpoint still running (before the engine's connections close)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()
