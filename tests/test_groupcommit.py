"""The run's ledger writes off the event loop: batched when the disk is slow, inline when not.

A slow disk is stood in for by a ledger whose commits take ``delay`` seconds more (what a
10-25 ms flush on a spinning disk does to each transaction); the writes themselves are real, on
SQLite and PostgreSQL, and checked by reading the ledger back on a connection of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from batch.ledger import Ledger, TransitionInfo, open_ledger
from batch.ledger.driver import Cursor
from batch.ledger.groupcommit import GroupCommit
from batch.ledger.store import ScannedFile, StaleTransition, Write
from batch.states import JobState


class SlowDisk:
    """Makes every commit of ``ledger`` take ``delay`` seconds longer, and counts them."""

    def __init__(self, ledger: Ledger, delay: float) -> None:
        self.delay, self.commits, self.writes = delay, 0, 0
        self.threads: list[str] = []
        self._real = ledger.commit
        ledger.commit = self.commit  # type: ignore[method-assign]

    def commit(self, writes: Sequence[Write]) -> list[Exception | None]:
        self.commits += 1
        self.writes += len(writes)
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return self._real(writes)


@pytest.fixture
def ledger(ledger_location: str) -> Iterator[Ledger]:
    store = open_ledger(ledger_location)
    store.record_scan([ScannedFile("/src", f"{i}.jpg", f"{i}.jpg", 10, 1, f"{i:064x}")
                       for i in range(20)])
    yield store
    store.close()


def job_ids(ledger: Ledger) -> list[int]:
    return sorted(job.id for job in ledger.claimable([JobState.PENDING], 100))


def test_writes_from_many_stages_share_transactions_while_the_loop_runs_on(
        ledger: Ledger, ledger_location: str) -> None:
    disk = SlowDisk(ledger, 0.03)
    writes = GroupCommit(ledger, inline_below=0)
    ids = job_ids(ledger)

    async def scenario() -> int:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(writes.transition(i, JobState.SUBMITTING, expect=JobState.PENDING,
                                                 info=TransitionInfo(message="uploading"))
                               for i in ids))
        stop.set()
        await tick
        return ticks

    ticks = asyncio.run(scenario())
    writes.close()
    # 20 writes, 30 ms a commit: one by one they would take 0.6 s with the loop stopped.
    assert disk.writes == 20 and disk.commits <= 4
    assert ticks >= 5
    other = open_ledger(ledger_location)
    try:
        assert other.counts()["submitting"] == 20
        assert all(len(other.history(i)) == 1 for i in ids)
    finally:
        other.close()


def test_a_failing_write_is_rolled_back_alone_and_raised_to_its_caller(
        ledger: Ledger, ledger_location: str) -> None:
    disk = SlowDisk(ledger, 0.02)
    writes = GroupCommit(ledger, inline_below=0)
    first, second, third = job_ids(ledger)[:3]

    async def scenario() -> list[object]:
        return await asyncio.gather(
            writes.transition(first, JobState.SUBMITTING, expect=JobState.PENDING),
            writes.transition(second, JobState.READY, expect=JobState.PROCESSING),  # stale
            writes.transition(third, JobState.SUBMITTING, expect=JobState.PENDING),
            return_exceptions=True)

    outcomes = asyncio.run(scenario())
    writes.close()
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], StaleTransition)
    assert disk.commits < 3  # they did share a transaction
    other = open_ledger(ledger_location)
    try:
        assert [other.job(i).state for i in (first, second, third)] == [
            JobState.SUBMITTING, JobState.PENDING, JobState.SUBMITTING]
        assert other.history(second) == []
    finally:
        other.close()


def test_writes_are_inline_on_a_fast_disk_and_handed_over_once_it_is_slow(
        ledger: Ledger) -> None:
    ids = iter(job_ids(ledger))
    writes = GroupCommit(ledger)

    async def submit_one() -> None:
        await writes.transition(next(ids), JobState.SUBMITTING, expect=JobState.PENDING)

    async def scenario() -> SlowDisk:
        disk = SlowDisk(ledger, 0.0)
        await submit_one()
        disk.delay = 0.02
        for _ in range(3):
            await submit_one()
        disk.delay = 0.0
        for _ in range(12):
            await submit_one()
        return disk

    disk = asyncio.run(scenario())
    writes.close()
    loop_thread = threading.main_thread().name
    # Fast: on the loop. The first slow commit is made there too (nothing told it apart
    # yet); the next ones go to the writer, until fast commits bring the average back down.
    assert disk.threads[:2] == [loop_thread, loop_thread]
    assert disk.threads[2:4] == ["ledger-writer", "ledger-writer"]
    assert disk.threads[-1] == loop_thread and writes.commit_seconds < 0.002
    assert ledger.counts()["submitting"] == 16


def test_a_write_that_fails_half_way_leaves_nothing_behind(ledger: Ledger) -> None:
    """Each write in a shared transaction has its own savepoint: one that fails after
    writing is undone, and only it."""
    SlowDisk(ledger, 0.02)
    writes = GroupCommit(ledger, inline_below=0)
    first, second = job_ids(ledger)[:2]
    moved = ledger.transition_write(second, JobState.SUBMITTING, expect=JobState.PENDING)

    def half_way(cur: Cursor) -> None:
        moved.run(cur)
        raise ValueError("the disk said no half-way")

    async def scenario() -> list[object]:
        return await asyncio.gather(
            writes.transition(first, JobState.SUBMITTING, expect=JobState.PENDING),
            writes.commit(Write(half_way)), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    writes.close()
    assert outcomes[0] is None and isinstance(outcomes[1], ValueError)
    assert (ledger.job(first).state, ledger.job(second).state) == (
        JobState.SUBMITTING, JobState.PENDING)
    assert ledger.history(second) == []


def test_a_cancelled_caller_still_finds_its_write_committed(ledger: Ledger) -> None:
    """The submitter's clean-up after a cancel relies on the state it wrote being there."""
    SlowDisk(ledger, 0.1)
    writes = GroupCommit(ledger, inline_below=0)
    job = job_ids(ledger)[0]

    async def scenario() -> JobState:
        task = asyncio.create_task(writes.transition(job, JobState.SUBMITTING,
                                                     expect=JobState.PENDING))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ledger.job(job).state

    assert asyncio.run(scenario()) is JobState.SUBMITTING
    writes.close()
