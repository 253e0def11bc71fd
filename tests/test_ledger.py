"""The ledger's behaviour, run against every backend (SQLite file and PostgreSQL server)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from batch import answers
from batch.api.errors import UPLOADS_FAILED
from batch.ledger import Ledger, ScannedFile, TransitionInfo, open_ledger
from batch.ledger.store import RECORD_CHUNK, Requeued, StaleTransition
from batch.requeue import try_again_given_up
from batch.stages.runtime import Answered, QueuedTask
from batch.states import TRANSITIONS, IllegalTransition, JobState, illegal_pairs
from tests.dbproxy import DatabaseProxy


@pytest.fixture
def ledger(ledger_location: str) -> Iterator[Ledger]:
    store = open_ledger(ledger_location)
    yield store
    store.close()


def scanned(rel: str, sha: str | None, root: str = "/src", problem: str | None = None,
            options_fp: str = "100000000") -> ScannedFile:
    return ScannedFile(root, rel, rel, 10, 1, sha, options_fp, problem)


def record(ledger: Ledger, found: list[ScannedFile], options_fp: str) -> int:
    return ledger.record_files([f._replace(options_fp=options_fp) for f in found]).created


class TestLedger:
    def test_identical_content_is_one_job_with_two_files(self, ledger: Ledger) -> None:
        created = record(ledger, [scanned("a.jpg", "a" * 64), scanned("copy/a.jpg", "a" * 64),
                                      scanned("b.jpg", "b" * 64)], "100000000")
        assert created == 2
        assert ledger.counts()["pending"] == 2
        job = ledger.claimable([JobState.PENDING], 10)[0]
        assert len(ledger.files_for_job(job.id)) in (1, 2)
        assert ledger.file_count() == 3

    def test_a_dismissed_failure_is_no_problem_until_it_is_put_back(self, ledger: Ledger
                                                                  ) -> None:
        found = [scanned(rel, sha * 64) for rel, sha in (
            ("products/bag.jpg", "a"), ("products/shoe.jpg", "b"), ("productsold/c.jpg", "c"))]
        record(ledger, found, "100000000")
        for job in ledger.jobs_in([JobState.PENDING]):
            ledger.transition(job.id, JobState.FAILED, expect=JobState.PENDING,
                              info=TransitionInfo(message="No face detected"))
        assert ledger.dismiss(["/src/products"], "dismissed") == 2
        assert ledger.dismiss(["/src/products"], "dismissed") == 0
        assert ledger.dismissed() == ["/src/products/bag.jpg", "/src/products/shoe.jpg"]
        assert [p.path for p in ledger.problems()] == ["/src/productsold/c.jpg"]
        assert ledger.reset_jobs([JobState.FAILED], "again", ["/src/products/bag.jpg"]).moved == 1
        assert ledger.dismissed() == ["/src/products/shoe.jpg"]
        assert ledger.counts()["pending"] == 1

    def test_uploads_the_api_failed_are_tried_once_more_unless_dismissed(
            self, ledger: Ledger) -> None:
        record(ledger, [scanned(f"{c}.jpg", c * 64) for c in "abc"], "100000000")
        a, b, c = (j.id for j in sorted(ledger.jobs_in([JobState.PENDING]),
                                        key=lambda j: j.content_sha256))
        gave_up = TransitionInfo(error_code=UPLOADS_FAILED, message="gave up after 5 attempts")
        for job in (a, b, c):
            ledger.transition(job, JobState.FAILED, info=gave_up)
        assert ledger.dismiss(["/src/c.jpg"], "dismissed") == 1
        assert try_again_given_up(ledger) == 2
        assert ledger.states_of([a, b, c]) == {a: JobState.PENDING, b: JobState.PENDING,
                                               c: JobState.FAILED}
        assert ledger.failures_with(a, UPLOADS_FAILED) == 1
        # Given up so again, the submitter leaves it unmarked, for a person.
        ledger.transition(a, JobState.FAILED, info=TransitionInfo(
            http_status=502, message="gave up after 5 attempts (given up in an earlier run "
                                     "too): the API answered HTTP 502"))
        ledger.transition(b, JobState.FAILED, info=TransitionInfo(
            error_code="ERROR_NO_FACE_IN_FILE", message="No face detected"))
        assert try_again_given_up(ledger) == 0
        assert ledger.failures_with(a, UPLOADS_FAILED) == 1
        assert set(ledger.states_of([a, b, c]).values()) == {JobState.FAILED}

    def test_a_failed_download_is_fetched_again_while_its_link_lives(
            self, ledger: Ledger) -> None:
        """Failed for its download, a photo is paid for: put back while its result's link
        lives, it goes back to be downloaded; past it, to be sent (and paid) again."""
        record(ledger, [scanned(f"{c}.jpg", c * 64) for c in "abc"], "100000000")
        live, dead, upload = (j.id for j in sorted(ledger.jobs_in([JobState.PENDING]),
                                                   key=lambda j: j.content_sha256))
        now = time.time()
        for paid, expires in ((live, now + 3600), (dead, now - 60)):
            for state in (JobState.SUBMITTING, JobState.QUEUED):
                ledger.transition(paid, state)
            ledger.transition(paid, JobState.READY, result_urls=["https://r.test/x.jpg"],
                              expires_at=expires)
            ledger.transition(paid, JobState.FAILED, info=TransitionInfo(
                message="the result is 4210 bytes, over the 2000-byte cap"))
        ledger.transition(upload, JobState.FAILED, info=TransitionInfo(
            error_code="ERROR_NO_FACE_IN_FILE", message="No face detected"))
        [problem] = [p for p in ledger.problems() if p.path == "/src/a.jpg"]
        assert "paid for: skinbatch retry --failed downloads it again" in problem.reason
        assert all("retry --failed downloads" not in p.reason for p in ledger.problems()
                   if p.path != "/src/a.jpg")
        assert ledger.reset_jobs([JobState.FAILED], "again", ["/src/b.jpg", "/src/c.jpg"]) == (
            Requeued(moved=2, fetched=0))  # a dead link, no result: sent again
        assert ledger.reset_jobs([JobState.FAILED], "again") == Requeued(moved=1, fetched=1)
        assert ledger.states_of([live, dead, upload]) == {
            live: JobState.READY, dead: JobState.PENDING, upload: JobState.PENDING}
        [job] = ledger.claimable([JobState.READY], 10)
        assert job.id == live and job.attempts == 0 and job.reason is None
        assert job.result_urls == ["https://r.test/x.jpg"]

    def test_an_answer_kept_while_the_ledger_was_away_is_recorded_only_for_its_own_job(
            self, ledger: Ledger) -> None:
        """An answer kept on this machine names its job by id; a ledger started anew in the
        old one's place has other jobs under those ids, and none of them takes the task."""
        record(ledger, [scanned(f"{c}.jpg", c * 64) for c in "ab"], "100000000")
        a, b = (j.id for j in sorted(ledger.jobs_in([JobState.PENDING]),
                                     key=lambda j: j.content_sha256))
        for job in (a, b):
            ledger.transition(job, JobState.SUBMITTING)
        now = time.time()
        kept = [Answered(QueuedTask(a, "task-a", now, now + 3600), "a" * 64, "100000000"),
                Answered(QueuedTask(b, "task-x", now, now + 3600), "x" * 64, "100000000"),
                Answered(QueuedTask(999, "task-y", now, now + 3600), "y" * 64, "100000000")]
        answers.record(ledger, kept)
        assert kept == []
        assert ledger.states_of([a, b]) == {a: JobState.QUEUED, b: JobState.SUBMITTING}
        assert ledger.job(a).task_id == "task-a" and ledger.job(b).task_id is None
        assert ledger.charges() == 1

    def test_photos_paid_again_under_new_options_count_once_sent_too(
            self, ledger: Ledger) -> None:
        """The run says how many photos it pays for again under new options when its scan
        ends; one whose upload went out before that (a long scan beside the uploads) still
        counts, and one sent by an earlier run does not."""
        record(ledger, [scanned(f"{c}.jpg", c * 64) for c in "abc"], "100000000")
        for job in ledger.jobs_in([JobState.PENDING]):
            for state in (JobState.SUBMITTING, JobState.QUEUED, JobState.READY,
                          JobState.DOWNLOADING, JobState.DONE):
                ledger.transition(job.id, state, submitted_at=1000.0)
        record(ledger, [scanned(f"{c}.jpg", c * 64) for c in "abc"], "010000000")
        earlier, sent, _waiting = sorted(ledger.jobs_in([JobState.PENDING]),
                                        key=lambda j: j.content_sha256)
        for job, at in ((earlier, 1500.0), (sent, 2500.0)):
            for state in (JobState.SUBMITTING, JobState.QUEUED):
                ledger.transition(job.id, state, submitted_at=at)
        ledger.transition(earlier.id, JobState.PROCESSING)
        assert ledger.count_in([JobState.PENDING], redone=True) == 1
        assert ledger.count_in([JobState.PENDING], redone=True, sent_since=2000.0) == 2
        assert ledger.count_in([JobState.PENDING], sent_since=2000.0) == 2  # not the old ones

    def test_new_options_make_a_new_job_for_the_same_content(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64)], "100000000")
        assert record(ledger, [scanned("a.jpg", "a" * 64)], "010000000") == 1
        # the file now points at the new job only; the old one is no longer wanted
        assert ledger.counts()["pending"] == 1

    def test_jobs_follow_the_scan_order_and_a_failed_record_leaves_nothing(
            self, ledger: Ledger) -> None:
        found = [scanned(f"{name}.jpg", name * 64) for name in "dcba"]
        found.insert(2, scanned("unreadable.jpg", None, problem="cannot be read"))
        assert record(ledger, found, "100000000") == 4
        jobs = ledger.jobs_in([JobState.PENDING])
        assert [job.content_sha256[0] for job in sorted(jobs, key=lambda j: j.id)] == list("dcba")
        assert [p.path for p in ledger.problems()] == ["/src/unreadable.jpg"]
        # a file without a root cannot be recorded: its whole batch is rolled back...
        broken = [scanned("e.jpg", "e" * 64), scanned("f.jpg", "f" * 64)._replace(root=None)]  # type: ignore[arg-type]
        with pytest.raises(Exception, match=r"(?i)null"):
            record(ledger, broken, "100000000")
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

    def test_a_scan_bigger_than_one_statement_links_every_file_to_its_job(
            self, ledger: Ledger) -> None:
        """Copies of one content spread over several statements' worth of rows: one job each
        content, every file linked to it, and recording the same files again adds nothing."""
        n = RECORD_CHUNK * 2 + 7
        found = [scanned(f"p{i % 9}/{i}.jpg", f"{i % 700:064x}") for i in range(n)]
        found.append(scanned("bad.jpg", None, problem="cannot be read"))
        assert ledger.record_files(found).created == 700
        assert ledger.file_count() == n + 1
        job = next(j for j in ledger.jobs_in([JobState.PENDING]) if j.content_sha256 == f"{5:064x}")
        assert sorted(f.rel_path for f in ledger.files_for_job(job.id)) == sorted(
            f"p{i % 9}/{i}.jpg" for i in range(n) if i % 700 == 5)
        assert [p.path for p in ledger.problems()] == ["/src/bad.jpg"]
        assert ledger.record_files(found).created == 0
        assert ledger.file_count() == n + 1

    def test_transitions_write_history_and_refuse_illegal_moves(self, ledger: Ledger) -> None:
        record(ledger, [scanned("a.jpg", "a" * 64)], "100000000")
        job = ledger.claimable([JobState.PENDING], 1)[0]
        ledger.transition(job.id, JobState.SUBMITTING, expect=JobState.PENDING)
        ledger.transition(job.id, JobState.QUEUED, task_id="t-1",
                          info=TransitionInfo(http_status=200, request_id="r1", log_id="l1"))
        with pytest.raises(IllegalTransition):
            ledger.transition(job.id, JobState.SUBMITTING)
        with pytest.raises(TypeError, match="state"):
            ledger.transition(job.id, JobState.PROCESSING, state="done")
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
                        scanned("locked.jpg", None,
                                problem="permission denied: the file cannot be read")],
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
        assert ledger.reset_jobs([JobState.FAILED], "x").moved == 0
        assert ledger.reset_jobs([JobState.REJECTED], "retry").moved == 1
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


def _a_job_in(ledger: Ledger, state: JobState, sha: str) -> int:
    """A job brought to ``state`` through legal moves only."""
    ledger.record_files([scanned(f"{sha[:6]}.jpg", sha)])
    [job] = [j for j in ledger.jobs_in([JobState.PENDING]) if j.content_sha256 == sha]
    path = {JobState.PENDING: [], JobState.SUBMITTING: [JobState.SUBMITTING],
            JobState.AMBIGUOUS: [JobState.SUBMITTING, JobState.AMBIGUOUS],
            JobState.QUEUED: [JobState.SUBMITTING, JobState.QUEUED],
            JobState.PROCESSING: [JobState.SUBMITTING, JobState.QUEUED, JobState.PROCESSING],
            JobState.READY: [JobState.SUBMITTING, JobState.QUEUED, JobState.READY],
            JobState.DOWNLOADING: [JobState.SUBMITTING, JobState.QUEUED, JobState.READY,
                                   JobState.DOWNLOADING],
            JobState.DONE: [JobState.SUBMITTING, JobState.QUEUED, JobState.READY,
                            JobState.DOWNLOADING, JobState.DONE],
            JobState.FAILED: [JobState.FAILED], JobState.REJECTED: [JobState.REJECTED],
            JobState.EXPIRED: [JobState.SUBMITTING, JobState.QUEUED, JobState.EXPIRED]}[state]
    for target in path:
        ledger.transition(job.id, target)
    assert ledger.job(job.id).state is state
    return job.id


def test_the_database_refuses_every_illegal_transition_and_unknown_state(
        ledger: Ledger) -> None:
    """Written straight to the table, past the Python check: the trigger refuses every move
    the table forbids, allows every move it allows, and the CHECK refuses unknown states."""
    ids = {state: _a_job_in(ledger, state, f"{n:064x}") for n, state in enumerate(JobState)}

    def move(job_id: int, target: str) -> None:
        with ledger.engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET state = :s WHERE id = :id"),
                         {"s": target, "id": job_id})

    refused = 0
    for current, target in illegal_pairs():
        with pytest.raises((IntegrityError, DBAPIError), match="illegal job state transition"):
            move(ids[current], target.value)
        refused += 1
    assert refused == len(illegal_pairs()) > 50
    for job_id in ids.values():
        with pytest.raises((IntegrityError, DBAPIError)):
            move(job_id, "finished")
    # the legal moves out of each state go through, and the job rests where it was put
    for current, targets in TRANSITIONS.items():
        for target in targets:
            job_id = _a_job_in(ledger, current, f"{hash((current, target)) & (2**64 - 1):064x}")
            move(job_id, target.value)
            assert ledger.job(job_id).state is target


def test_an_illegal_move_through_the_ledger_is_refused_before_the_database(
        ledger: Ledger) -> None:
    job_id = _a_job_in(ledger, JobState.DONE, "d" * 64)
    with pytest.raises(IllegalTransition):
        ledger.transition(job_id, JobState.SUBMITTING, expect=JobState.DONE)
    assert ledger.job(job_id).state is JobState.DONE


def test_an_existing_ledger_is_upgraded_with_its_rows_kept(tmp_path: Path) -> None:
    """A ledger made by the previous release (revision 0003) gets the guards on open."""
    from alembic import command

    from batch.ledger.engine import create_ledger_engine
    from batch.ledger.migrate import alembic_config

    path = tmp_path / "old.sqlite"
    engine = create_ledger_engine(path)
    command.upgrade(alembic_config(engine), "0003")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, content_sha256, options_fp, size_bytes, state, created_at, "
            "updated_at, next_attempt_at, attempts, charges) "
            "VALUES (1, :sha, '100000000', 5, 'done', 0, 0, 0, 0, 1)"), {"sha": "e" * 64})
        conn.execute(text("UPDATE jobs SET state = 'submitting' WHERE id = 1"))  # unguarded
        conn.execute(text("UPDATE jobs SET state = 'done' WHERE id = 1"))
    engine.dispose()
    ledger = open_ledger(path)
    try:
        assert ledger.job(1).state is JobState.DONE and ledger.charges() == 1
        with pytest.raises(IntegrityError), ledger.engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET state = 'submitting' WHERE id = 1"))
        with pytest.raises(IntegrityError), ledger.engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET state = 'bogus' WHERE id = 1"))
    finally:
        ledger.close()


def test_only_what_the_next_run_redoes_for_free_skips_the_flush(ledger: Ledger) -> None:
    """Scan records and moves a power cut could only undo to a step the next run repeats for
    free (a status query, a download) skip the flush; every other state change (an upload
    about to start or answered, a result saved) waits for the disk. Read off the connection
    at the moment each statement runs (SQLite: PRAGMA synchronous; PostgreSQL:
    synchronous_commit)."""
    sqlite = ledger.engine.dialect.name == "sqlite"
    probe = "PRAGMA synchronous" if sqlite else "SHOW synchronous_commit"
    seen: list[tuple[str, bool]] = []

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def watch(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        words = statement.split()
        what = " ".join(words[:3]).upper()
        if what.startswith(("INSERT INTO FILES", "INSERT INTO FOLDERS", "UPDATE JOBS SET")):
            value = cursor.connection.execute(probe).fetchone()[0]
            seen.append((words[2 if what.startswith("INSERT") else 1].lower(), value in (2, "on")))

    ledger.record_files([scanned("a.jpg", "a" * 64)])
    ledger.save_folder_digests("/src", {"": ("d" * 40, 1)}, [])
    [job] = ledger.claimable([JobState.PENDING], 1)
    moves: list[tuple[JobState, dict[str, Any]]] = [
             (JobState.SUBMITTING, {}), (JobState.QUEUED, {"task_id": "t"}),
             (JobState.PROCESSING, {}), (JobState.READY, {"result_urls": ["u"]}),
             (JobState.DOWNLOADING, {}), (JobState.READY, {}), (JobState.DOWNLOADING, {})]
    for target, fields in moves:
        ledger.transition(job.id, target, **fields)
    ledger.commit([ledger.finish_download_write(job.id, "b" * 64, {}, {})])
    event.remove(ledger.engine, "before_cursor_execute", watch)
    assert seen == [("files", False), ("folders", False), ("jobs", True), ("jobs", True),
                    ("jobs", False), ("jobs", False), ("jobs", False), ("jobs", False),
                    ("jobs", False), ("jobs", True)]
    assert ledger.job(job.id).state is JobState.DONE


@pytest.mark.postgres
@pytest.mark.parametrize("lost", ["submitting", "queued"])
def test_a_move_whose_commit_answer_was_lost_is_made_once(pg_url: str, lost: str) -> None:
    """The database goes away just after it committed a move and before its answer came
    back (a restart at that moment): the move is tried again, as it may not have been made,
    and is found made. It is neither refused as another worker's (a worker stopped on it,
    or, before an upload, left the job in 'submitting' and its run waiting for ever) nor
    made, charged or recorded twice."""
    with DatabaseProxy() as proxy:
        ledger = open_ledger(proxy.url(pg_url))
        ledger.patience = 30
        try:
            ledger.record_files([scanned("a.jpg", "a" * 64)])
            [job] = ledger.claimable([JobState.PENDING], 1)
            if lost == "submitting":
                proxy.lose_next_commit_answer()
            ledger.transition(job.id, JobState.SUBMITTING, expect=JobState.PENDING)
            if lost == "queued":
                proxy.lose_next_commit_answer()
            ledger.transition(job.id, JobState.QUEUED, expect=JobState.SUBMITTING,
                              task_id="t1", charge=True)
            assert proxy.lost_answers == 1
            assert ledger.job(job.id).state is JobState.QUEUED and ledger.charges() == 1
            moves = [(e["from_state"], e["to_state"]) for e in ledger.history(job.id)]
            assert moves.count(("pending", "submitting")) == 1, moves
            assert moves.count(("submitting", "queued")) == 1, moves
        finally:
            ledger.close()


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
