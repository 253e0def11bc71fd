"""The run's ledger writes, committed off the event loop, many to a transaction.

A stage used to commit each move of its job on the event loop's thread, waiting there for the
disk's flush. On a disk whose flush takes 10-25 ms (a spinning disk, some network shares) those
waits stopped the loop for most of every second: against the emulator, throughput fell from
0.95 of the API's bound to 0.83 at 10 ms and 0.53 at 25 ms. Here a stage hands its write over
and awaits it; one writer thread commits every write waiting at that moment in one transaction
(each in its own savepoint, see :meth:`Ledger.commit`) with one flush for all of them, while the
loop goes on with uploads, polls and downloads. A caller resumes only once its write is
committed: "``submitting`` is on disk before the upload starts" holds as before.

Where the disk flushes fast (this VM, most SSDs) a durable commit costs about a third of a
millisecond, and handing it to a thread and back costs more CPU than waiting for it; so writes
are made right there on the loop while durable commits keep taking under ``inline_below`` on
average, and go to the writer thread as soon as they do not (or while it has work in hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any

from batch.ledger.store import Ledger, TransitionInfo, Write
from batch.states import JobState

log = logging.getLogger("batch")

#: Writes per transaction at most (a transaction holds the ledger's write lock).
MAX_BATCH = 256
#: Inline writes while durable commits take less than this on average (seconds).
INLINE_BELOW = 0.002
#: Weight of the latest durable commit in that average.
_WEIGHT = 0.2

_Item = tuple[Write, asyncio.Future[None]]


class GroupCommit:
    def __init__(self, ledger: Ledger, *, inline_below: float = INLINE_BELOW) -> None:
        self.ledger = ledger
        self.inline_below = inline_below
        #: Moving average of a durable commit's time, inline or in the thread (seconds).
        self.commit_seconds = 0.0
        self._handed = 0
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._told = False

    async def commit(self, write: Write) -> None:
        """Commit ``write``; raises its error. Cancelling the caller does not cancel the write
        once handed over: the caller then waits for it to be committed before the
        cancellation goes on, as when the write was a plain call (a stage's clean-up after a
        cancel must see the state it left)."""
        if self._handed == 0 and self.commit_seconds < self.inline_below:
            started = time.perf_counter()
            try:
                self.ledger.commit([write])
            finally:
                if write.durable:
                    self._observe(time.perf_counter() - started)
            return
        if self._thread is None:
            if not self._told:
                log.info("Ledger commits take %.0f ms (a slow disk?): they are now made in the "
                         "background, several at a time.", self.commit_seconds * 1000)
                self._told = True
            self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
            self._thread.start()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handed += 1
        self._queue.put((write, future))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(future)
            raise
        finally:
            self._handed -= 1

    def _observe(self, seconds: float) -> None:
        self.commit_seconds += _WEIGHT * (seconds - self.commit_seconds)

    async def transition(self, job_id: int, target: JobState, **kwargs: Any) -> None:
        """:meth:`Ledger.transition`, committed here (the stages' writes are made through
        these three)."""
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

    def close(self) -> None:
        """Commit what was handed over, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
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
            started = time.perf_counter()
            try:
                outcomes = list(self.ledger.commit([write for write, _ in batch]))
                if any(write.durable for write, _ in batch):
                    self._observe(time.perf_counter() - started)
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
