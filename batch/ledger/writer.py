"""The run's ledger writes, made by one thread of their own, several to a transaction.

The stages run on the event loop; a durable commit waits for the disk's flush (a third of a
millisecond on an SSD, tens on a spinning disk or a share). So every write a stage makes is
handed to one writer thread and awaited: the loop goes on with uploads, polls and downloads
meanwhile, and the writer commits every write waiting at that moment in one transaction (each
in its own savepoint, see :meth:`Ledger.commit`) with one flush. A caller resumes only once its
write is committed: "``submitting`` is on disk before the upload starts" holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import Any

from batch.ledger.store import Ledger, TransitionInfo, Write
from batch.states import JobState

#: Writes per transaction at most (a transaction holds the ledger's write lock).
MAX_BATCH = 256

_Item = tuple[Write, asyncio.Future[None]]


class LedgerWriter:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    async def commit(self, write: Write) -> None:
        """Commit ``write``; raises its error. Cancelling the caller does not cancel the write
        once handed over: the caller waits for it to be committed before the cancellation
        goes on (a stage's clean-up after a cancel must see the state it left)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put((write, future))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(future)
            raise

    async def transition(self, job_id: int, target: JobState, **kwargs: Any) -> None:
        """:meth:`Ledger.transition`, committed by the writer."""
        await self.commit(self.ledger.transition_write(job_id, target, **kwargs))

    async def note_attempt(self, job_id: int, info: TransitionInfo, *, attempts: int,
                           next_attempt_at: float) -> None:
        await self.commit(self.ledger.note_attempt_write(
            job_id, info, attempts=attempts, next_attempt_at=next_attempt_at))

    async def finish_download(self, job_id: int, result_sha256: str,
                              outputs: dict[int, tuple[str, str | None]],
                              problems: dict[int, str]) -> None:
        await self.commit(self.ledger.finish_download_write(job_id, result_sha256, outputs,
                                                            problems))

    async def forget_files(self, file_ids: list[int]) -> None:
        await self.commit(self.ledger.forget_files_write(file_ids))

    def close(self) -> None:
        """Commit what was handed over, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        with self.ledger.pinned():
            self._serve()

    def _serve(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            outcomes: list[BaseException | None]
            try:
                outcomes = list(self.ledger.commit([write for write, _ in batch]))
            except Exception as exc:  # the transaction itself failed: every write did
                outcomes = [exc] * len(batch)
            except BaseException as exc:  # no caller may wait for ever on a dead thread
                outcomes = [RuntimeError(f"the ledger writer stopped: {exc!r}")] * len(batch)
                stop = True
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                with contextlib.suppress(RuntimeError):  # the loop is gone (process exiting)
                    future.get_loop().call_soon_threadsafe(_settle, future, outcome)


def _settle(future: asyncio.Future[None], outcome: BaseException | None) -> None:
    if future.done():
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
