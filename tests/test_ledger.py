"""The ledger's behaviour, run against every backend (SQLite file and PostgreSQL server)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from batch.ledger import Ledger, TransitionInfo, driver, open_ledger
from batch.ledger.store import ScannedFile, StaleTransition
from batch.scanrows import ScanRow, StagedRows
from batch.states import IllegalTransition, JobState


@pytest.fixture
def ledger(ledger_location: str) -> Ledger:
    store = open_ledger(ledger_location)
    yield store  # type: ignore[misc]
    store.close()


def scanned(rel: str, sha: str, root: str = "/src") -> ScannedFile:
    return ScannedFile(root, rel, rel, 10, 1, sha)


def record(ledger: Ledger, found: list[ScannedFile], options_fp: str) -> int:
    return ledger.record_scan([replace(f, options_fp=options_fp) for f in found])


class TestLedger:
    def test_identical_content_is_one_job_with_two_files(self, ledger: Ledger) -> None:
        created = record(ledger, [scanned("a.jpg", "a" * 64), scanned("copy/a.jpg", "a" * 64),
                                      scanned("b.jpg", "b" * 64)], "100000000")
        assert created == 2
        assert ledger.counts()["pending"] == 2
        job = ledger.claimable([JobState.PENDING], 10)[0]
        assert len(ledger.files_for_job(job.id)) in (1, 2)
        assert ledger.file_count() == 3

    def test_new_options_make_a_new_job_for_the_same_content(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64)], "100000000")
        assert record(ledger, [scanned("a.jpg", "a" * 64)], "010000000") == 1
        # the file now points at the new job only; the old one is no longer wanted
        assert ledger.counts()["pending"] == 1

    def test_jobs_follow_the_scan_order_and_a_failed_record_leaves_nothing(
            self, ledger: Ledger) -> None:
        found = [scanned(f"{name}.jpg", name * 64) for name in "dcba"]
        found.insert(2, replace(scanned("unreadable.jpg", "x"), content_sha256=None,
                                problem="cannot be read"))
        assert record(ledger, found, "100000000") == 4
        jobs = ledger.jobs_in([JobState.PENDING])
        assert [job.content_sha256[0] for job in sorted(jobs, key=lambda j: j.id)] == list("dcba")
        assert [p.path for p in ledger.problems()] == ["/src/unreadable.jpg"]
        # a file without a root cannot be recorded: its whole batch is rolled back...
        broken = [scanned("e.jpg", "e" * 64), replace(scanned("f.jpg", "f" * 64), root=None)]
        with pytest.raises(Exception, match=r"(?i)null"):
            record(ledger, broken, "100000000")  # type: ignore[arg-type]
        assert ledger.file_count() == 5 and ledger.counts()["pending"] == 4
        # ...and nothing of it, or of the batch before, is left over for the next one (a
        # leftover row would record its file again, and undo what happened to it since)
        first = min(jobs, key=lambda j: j.id)
        ledger.set_file_output(ledger.files_for_job(first.id)[0].id, written_rel=None,
                               written_sha256=None, problem="output conflict")
        assert record(ledger, [scanned("g.jpg", "g" * 64)], "100000000") == 1
        assert sorted(p.path for p in ledger.problems()) == ["/src/d.jpg", "/src/unreadable.jpg"]
        assert sorted(job.content_sha256[0] for job in ledger.jobs_in([JobState.PENDING])) \
            == list("abcdg")
        assert ledger.file_count() == 6

    def test_rows_staged_by_workers_are_recorded_like_the_others(self, ledger: Ledger) -> None:
        """More staged parts than SQLite attaches to one connection, duplicates across them."""
        now = time.time()

        def row(rel: str, sha: str | None) -> ScanRow:
            return ("/src", rel, f"out/{rel}", 10, 1, sha, "100000000",
                    None if sha else "cannot be read", now)

        parts = [StagedRows.of([row(f"p{p}/{i}.jpg", f"{(p * 3 + i) % 40:064x}")
                                for i in range(3)]) for p in range(20)]
        parts.append(StagedRows.of([row("bad.jpg", None)]))
        assert parts[3].rows() == [row(f"p3/{i}.jpg", f"{9 + i:064x}") for i in range(3)]
        assert ledger.record_rows([row("own.jpg", "f" * 64)], parts) == 41
        assert ledger.file_count() == 62
        assert ledger.counts()["pending"] == 41
        job = next(j for j in ledger.jobs_in([JobState.PENDING]) if j.content_sha256 == f"{5:064x}")
        assert sorted(f.rel_path for f in ledger.files_for_job(job.id)) == [
            "p1/2.jpg", "p15/0.jpg"]
        assert [f.out_rel for f in ledger.files_for_job(job.id)] in (
            ["out/p1/2.jpg", "out/p15/0.jpg"], ["out/p15/0.jpg", "out/p1/2.jpg"])
        assert [p.path for p in ledger.problems()] == ["/src/bad.jpg"]
        # recorded again (a re-scan): nothing new
        assert ledger.record_rows([], parts) == 0
        assert ledger.file_count() == 62

    def test_transitions_write_history_and_refuse_illegal_moves(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64)], "100000000")
        job = ledger.claimable([JobState.PENDING], 1)[0]
        ledger.transition(job.id, JobState.SUBMITTING, expect=JobState.PENDING)
        ledger.transition(job.id, JobState.QUEUED, task_id="t-1",
                          info=TransitionInfo(http_status=200, request_id="r1", log_id="l1"))
        with pytest.raises(IllegalTransition):
            ledger.transition(job.id, JobState.SUBMITTING)
        ledger.transition(job.id, JobState.PROCESSING, expect=JobState.QUEUED)
        with pytest.raises(StaleTransition):
            ledger.transition(job.id, JobState.READY, expect=JobState.QUEUED)
        history = ledger.history(job.id)
        assert [(h["from_state"], h["to_state"]) for h in history] == [
            ("pending", "submitting"), ("submitting", "queued"), ("queued", "processing")]
        assert history[1]["request_id"] == "r1" and history[1]["log_id"] == "l1"
        assert ledger.job(job.id).task_id == "t-1"

    def test_recovery_marks_lost_answers_ambiguous_and_charges_them(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64), scanned("b.jpg", "b" * 64)], "100000000")
        a, b = ledger.claimable([JobState.PENDING], 2)
        ledger.transition(a.id, JobState.SUBMITTING)
        ledger.transition(b.id, JobState.SUBMITTING)
        ledger.transition(b.id, JobState.QUEUED, task_id="t")
        ledger.transition(b.id, JobState.READY, result_urls=["http://x/r.jpg"])
        ledger.transition(b.id, JobState.DOWNLOADING)
        assert ledger.recover_interrupted() == {"ambiguous": 1, "ready": 1}
        assert ledger.job(a.id).state is JobState.AMBIGUOUS
        assert ledger.job(a.id).error_code == "AMBIGUOUS_SUBMIT"
        assert ledger.job(b.id).state is JobState.READY
        assert ledger.job(b.id).result_urls == ["http://x/r.jpg"]
        assert ledger.ambiguous_events() == 1

    def test_backoff_hides_a_job_until_its_time(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64)], "100000000")
        job = ledger.claimable([JobState.PENDING], 1)[0]
        ledger.transition(job.id, JobState.SUBMITTING)
        ledger.transition(job.id, JobState.PENDING, attempts=1, next_attempt_at=10**12)
        assert ledger.claimable([JobState.PENDING], 5) == []
        assert ledger.claimable([JobState.PENDING], 5, now=10**12 + 1)[0].attempts == 1

    def test_problems_list_files_with_reasons(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64),
                            ScannedFile("/src", "locked.jpg", "locked.jpg", 0, 0, None,
                                        "permission denied: the file cannot be read")],
                           "100000000")
        job = ledger.claimable([JobState.PENDING], 1)[0]
        ledger.transition(job.id, JobState.REJECTED,
                          info=TransitionInfo(message="not an image"))
        problems = {p.path: p.reason for p in ledger.problems()}
        assert problems == {"/src/a.jpg": "not an image",
                            "/src/locked.jpg": "permission denied: the file cannot be read"}

    def test_retry_puts_failed_jobs_back(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64)], "100000000")
        job = ledger.claimable([JobState.PENDING], 1)[0]
        ledger.transition(job.id, JobState.REJECTED, info=TransitionInfo(message="bad"))
        assert ledger.reset_jobs([JobState.FAILED], "x") == 0
        assert ledger.reset_jobs([JobState.REJECTED], "retry") == 1
        assert ledger.job(job.id).state is JobState.PENDING


def test_downloads_are_claimed_soonest_to_expire_first(ledger_location: str) -> None:
    ledger = open_ledger(ledger_location)
    record(ledger, [scanned(f"{c}.jpg", c * 64) for c in "abc"], "100000000")
    for job, expires in zip(ledger.claimable([JobState.PENDING], 3), (300.0, 100.0, 200.0),
                            strict=True):
        ledger.transition(job.id, JobState.SUBMITTING)
        ledger.transition(job.id, JobState.QUEUED, task_id=f"t{job.id}", expires_at=expires)
        ledger.transition(job.id, JobState.READY, result_urls=["http://r"])
    order = [j.expires_at for j in ledger.claimable([JobState.READY], 3,
                                                     soonest_expiry_first=True)]
    ledger.close()
    assert order == [100.0, 200.0, 300.0]


def test_bulk_writes_are_checkpointed_in_the_background(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A first scan's WAL is copied into the database by a thread of the ledger's own, not by
    the scan's commits (SQLite's autocheckpoint, which would stall them, is far off)."""
    monkeypatch.setattr(driver, "BULK_CHECKPOINT", 64)  # pages
    path = tmp_path / "l.sqlite"
    ledger = open_ledger(path)
    started: list[str] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        started.append(thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    empty = path.stat().st_size
    for part in range(4):
        record(ledger, [scanned(f"{part}/{i}.jpg", f"{part:08x}{i:056x}") for i in range(500)],
               "100000000")
    ledger._driver._checkpoint.close()  # type: ignore[union-attr]
    assert "ledger-checkpoint" in started
    assert path.stat().st_size > empty + 200_000  # the rows' pages are in the database file
    assert ledger.file_count() == 2000
    ledger.close()
    assert open_ledger(path).file_count() == 2000


def test_only_what_the_next_run_redoes_for_free_skips_the_fsync(tmp_path: Path) -> None:
    """Scan records and moves a power cut could only undo to a step the next run repeats for
    free (a status query, a download) may skip the fsync; every other state change (an upload
    about to start or answered, a result saved) commits with synchronous=FULL."""
    ledger = open_ledger(tmp_path / "l.sqlite")
    ledger.engine.pool.dispose()  # one connection from here on, shared by both write paths
    seen: list[tuple[str, int]] = []

    def synchronous() -> int:
        with ledger._driver.transaction(write=False) as cur:
            return int(cur._cursor.execute("PRAGMA synchronous").fetchone()[0])

    ledger.record_scan([ScannedFile("/r", "a.jpg", "a.jpg", 1, 1, "a" * 64)])
    seen.append(("scan", synchronous()))
    ledger.save_folder_digests("/r", {"": ("d" * 40, 1)}, [])
    seen.append(("folders", synchronous()))
    assert ledger.folder_digests("/r") == {"": ("d" * 40, 1)}
    [job] = ledger.claimable([JobState.PENDING], 1)
    for target, fields in [(JobState.SUBMITTING, {}), (JobState.QUEUED, {"task_id": "t"}),
                           (JobState.PROCESSING, {}), (JobState.READY, {"result_urls": ["u"]}),
                           (JobState.DOWNLOADING, {}), (JobState.READY, {}),
                           (JobState.DOWNLOADING, {})]:
        ledger.transition(job.id, target, **fields)
        seen.append((target.value, synchronous()))
    ledger.commit([ledger.finish_download_write(job.id, "b" * 64, {}, {})])
    seen.append(("done", synchronous()))
    assert seen == [("scan", 1), ("folders", 1), ("submitting", 2), ("queued", 2),
                    ("processing", 1), ("ready", 1), ("downloading", 1), ("ready", 1),
                    ("downloading", 1), ("done", 2)]
    # ... and foreign keys are enforced again after the scan, on the connection it used.
    with pytest.raises(sqlite3.IntegrityError), ledger._driver.transaction(write=True) as cur:
        cur._cursor.execute("INSERT INTO events (job_id, at, to_state, attempt) "
                            "VALUES (999, 0, 'done', 0)")


def test_many_threads_share_the_ledger_and_closing_it_closes_every_connection(
        tmp_path: Path) -> None:
    """More threads than the connection pool holds (a dry run checks files in a thread pool as
    wide as the machine) all get through, and closing the ledger leaves no file open."""
    path = tmp_path / "l.sqlite"
    ledger = open_ledger(path)
    width = 24
    record(ledger, [scanned(f"{i}.jpg", f"{i:064x}") for i in range(width)], "100000000")
    jobs = ledger.claimable([JobState.PENDING], width)
    together = threading.Barrier(width)
    errors: list[BaseException] = []

    def submit(job_id: int) -> None:
        try:
            together.wait(timeout=10)
            assert ledger.files_for_job(job_id)
            ledger.transition(job_id, JobState.SUBMITTING, expect=JobState.PENDING)
            together.wait(timeout=10)  # every thread still alive, holding what it holds
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(job.id,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ledger.counts()["submitting"] == width

    def open_on_ledger() -> list[str]:
        names = []
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith(str(path)):
                    names.append(target)
        return names

    assert open_on_ledger()
    ledger.close()
    assert open_on_ledger() == []


@pytest.mark.postgres
def test_postgresql_bulk_and_redoable_writes_skip_the_flush_and_others_do_not(
        pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    try:
        with ledger.engine.begin() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        for durable, bulk, expected in ((True, True, "off"), (False, False, "off"),
                                        (True, False, "on")):
            with ledger._driver.transaction(write=True, durable=durable, bulk=bulk) as cur:
                cur._cursor.execute("SHOW synchronous_commit")
                assert cur._cursor.fetchone()[0] == expected
        ledger.record_scan([ScannedFile("/r", "a.jpg", "a.jpg", 1, 1, "a" * 64)])
        assert ledger.counts()["pending"] == 1
        [job] = ledger.claimable([JobState.PENDING], 1)
        ledger.transition(job.id, JobState.SUBMITTING)
        ledger.transition(job.id, JobState.QUEUED, task_id="t")
        ledger.transition(job.id, JobState.READY, result_urls=["u"])
        assert ledger.job(job.id).state is JobState.READY
    finally:
        ledger.close()
