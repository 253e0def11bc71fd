"""Several runs on one PostgreSQL ledger: real worker processes, a real PostgreSQL server, the
emulator over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, func, select, text

from batch.emulator import Emulator
from batch.ledger import open_ledger
from batch.ledger.models import api_slots
from batch.ledger.workers import WorkerRecords
from batch.states import JobState
from batch.worker import SLACK, SLACK_CLEAN, SLACK_MAX, SLACK_STEP, SharedPace
from tests.checks import assert_ledger_sound, assert_no_double_pay, assert_outputs_right, ledger_of
from tests.conftest import MakeEmulator, popen_cli, run_cli, wait_for
from tests.dbproxy import DatabaseProxy
from tests.imagegen import write_portrait

pytestmark = pytest.mark.postgres

CEILING = 40
WORKER_FLAGS = ["--poll-interval", "0.05", "--no-progress", "--lease-seconds", "3"]
#: What a worker says, once an outage, when its ledger's database cannot be reached.
AWAY = "The ledger database cannot be reached"


def shoot(folder: Path, count: int, first_seed: int = 0) -> dict[str, bytes]:
    return {f"s{i // 50}/{i}.jpg": write_portrait(folder / f"s{i // 50}" / f"{i}.jpg",
                                                  seed=first_seed + i)
            for i in range(count)}


def start_workers(src: Path, out: Path, pg_url: str, emulator: Emulator, count: int,
                  *extra: str) -> list[subprocess.Popen[str]]:
    return [popen_cli(["run", str(src), "--out", str(out), "--ledger", pg_url,
                       "--worker-name", f"w{i}", "--max-qps", str(CEILING), *WORKER_FLAGS,
                       *extra], emulator) for i in range(count)]


def finish(workers: list[subprocess.Popen[str]], timeout: float = 240,
           said: list[str] | None = None) -> list[int]:
    """The workers' exit codes once they end; what each printed goes into ``said``."""
    codes = []
    for worker in workers:
        out, err = worker.communicate(timeout=timeout)
        if worker.returncode not in (0, -signal.SIGKILL):
            print(out, err)
        codes.append(worker.returncode)
        if said is not None:
            said.append(out)
    return codes


def print_unfinished(out: Path, pg_url: str) -> None:
    ledger = ledger_of(out, pg_url)
    try:
        for job in ledger.jobs_in(list(JobState)):
            if job.state is not JobState.DONE:
                print(job.id, job.state, [(f.root, f.rel_path, f.problem)
                                          for f in ledger.files_for_job(job.id)])
                for event in ledger.history(job.id):
                    print("   ", event)
    finally:
        ledger.close()


def uploads_by_worker(out: Path, pg_url: str) -> dict[str | None, int]:
    """Who made each accepted upload, from the history; and that no job was accepted twice."""
    ledger = ledger_of(out, pg_url)
    try:
        by_worker: dict[str | None, int] = {}
        for job in ledger.jobs_in(list(JobState)):
            history = ledger.history(job.id)
            accepted = [e["worker"] for e in history
                        if e["to_state"] == "queued" and e["from_state"] == "submitting"]
            assert len(accepted) <= 1, history
            for worker in accepted:
                by_worker[worker] = by_worker.get(worker, 0) + 1
        return by_worker
    finally:
        ledger.close()


def test_three_workers_share_one_ledger_and_one_ceiling(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """All three scan the same shared tree at once: one job per distinct image, each uploaded
    by one worker, the API's ceiling held by all of them together."""
    emulator = make_emulator(qps_limit=CEILING)
    src, out = tmp_path / "nas" / "shoots", tmp_path / "nas" / "retouched"
    sources = shoot(src, 200)
    said: list[str] = []
    codes = finish(start_workers(src, out, pg_url, emulator, 3), said=said)
    assert codes == [0, 0, 0]
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 200
    # The server takes CEILING in any one second and refuses the rest. Every request was
    # booked in the ledger's one pace for the API host; a request that leaves its worker late
    # (a busy machine) shares a second with the one booked a spacing after it, and the 429
    # widens the margin. A few in a hundred at most, even on a loaded machine (a 429 costs a
    # retry, no credit).
    requests = emulator.stats["submits"] + emulator.stats["queries"]
    assert emulator.stats.get("rate_limited", 0) <= 0.05 * requests, emulator.stats
    assert emulator.state.busiest_second(offered=True) <= 1.25 * CEILING
    assert emulator.state.busiest_second() <= CEILING
    by_worker = uploads_by_worker(out, pg_url)
    assert sum(by_worker.values()) == 200
    assert set(by_worker) == {"w0", "w1", "w2"}, by_worker  # all three did work
    # Each one's summary counts the credits its own uploads cost, not the others'.
    charged = [re.findall(r"credits charged this run: (\d+) ", text) for text in said]
    assert charged == [[str(by_worker[f"w{i}"])] for i in range(3)], said
    ledger = ledger_of(out, pg_url)
    try:
        assert ledger.counts()["done"] == 200 and ledger.file_count() == 200
        with ledger.engine.connect() as conn:  # the workers booked their requests in one row
            assert conn.scalar(select(func.count()).select_from(api_slots).where(
                api_slots.c.api_base == emulator.api_base)) == 1
        assert {w.name: w.stopped_at is not None for w in WorkerRecords(ledger).listing()} == {
            "w0": True, "w1": True, "w2": True}
    finally:
        ledger.close()
    assert_ledger_sound(out, pg_url)
    status = run_cli(["status", "--out", str(out), "--ledger", pg_url, "--json"], None)
    listed = {w["name"]: w for w in json.loads(status.stdout)["workers"]}
    assert {name: w["uploaded"] for name, w in listed.items()} == by_worker
    assert all(w["saved"] > 0 and not w["live"] for w in listed.values())
    # The morning report, asked from any machine, names them too.
    assert run_cli(["report", "--out", str(out), "--ledger", pg_url, "--format", "json"],
                   None).returncode == 0
    reported = json.loads((out / "skinbatch-report.json").read_text())["workers"]
    assert {w["name"]: w["uploaded"] for w in reported} == by_worker
    assert run_cli(["report", "--out", str(out), "--ledger", pg_url], None).returncode == 0
    page = (out / "skinbatch-report.html").read_text()
    assert all(f"<li>{name} (" in page for name in by_worker)


def test_a_429_widens_the_margin_between_booked_moments_and_quiet_narrows_it(
        pg_url: str) -> None:
    """A request sent late shares a second with the one booked a spacing after it; the 429 it
    brings widens this worker's margin, and requests that pass narrow it back."""
    ledger = open_ledger(pg_url)
    pace = SharedPace(ledger, "http://api.example", max_qps=10.0)

    def free_line() -> None:
        """Nothing booked ahead: the next request goes at once."""
        with ledger.engine.begin() as conn:
            conn.execute(delete(api_slots))

    def spacing() -> float:
        """The gap between two moments booked back to back, in the ledger."""
        free_line()
        booked = []
        for _ in range(2):
            asyncio.run(pace())
            with ledger.engine.connect() as conn:
                booked.append(conn.execute(select(api_slots.c.next_at)).scalar_one())
        return float(booked[1] - booked[0])

    async def pass_quietly(count: int) -> None:
        for _ in range(count):
            free_line()
            await pace()

    try:
        assert spacing() == pytest.approx((1 + SLACK) / 10)
        for _ in range(3):
            pace.refused()
        assert spacing() == pytest.approx((1 + SLACK + 3 * SLACK_STEP) / 10)
        asyncio.run(pass_quietly(2 * SLACK_CLEAN))
        assert spacing() == pytest.approx((1 + SLACK + 2 * SLACK_STEP) / 10)
        asyncio.run(pass_quietly(6 * SLACK_CLEAN))
        assert spacing() == pytest.approx((1 + SLACK) / 10)  # never under the first margin
        for _ in range(60):
            pace.refused()
        assert spacing() == pytest.approx((1 + SLACK_MAX) / 10)  # at most a tenth of a second
    finally:
        pace.close()
        ledger.close()


@pytest.mark.parametrize("seed", [
    1, 2, *[pytest.param(s, marks=pytest.mark.slow) for s in range(3, 11)]])
def test_a_worker_killed_at_a_random_moment_loses_nothing(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str, seed: int) -> None:
    emulator = make_emulator(qps_limit=CEILING, queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "nas" / "shoots", tmp_path / "nas" / "retouched"
    sources = shoot(src, 120, first_seed=seed * 1000)
    workers = start_workers(src, out, pg_url, emulator, 3)
    rng = random.Random(seed)
    target = rng.randint(5, 90)  # somewhere among the uploads
    deadline = time.time() + 60
    while emulator.stats.get("charged", 0) < target and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.random() * 0.3)
    victim = rng.randrange(3)
    os.kill(workers[victim].pid, signal.SIGKILL)
    codes = finish(workers)
    assert codes[victim] == -signal.SIGKILL
    assert [c for i, c in enumerate(codes) if i != victim] == [0, 0]
    assert_outputs_right(out, sources, emulator)
    ambiguous = assert_no_double_pay(out, emulator, 120, pg_url)
    assert emulator.stats["charged"] <= 120 + ambiguous
    assert_ledger_sound(out, pg_url)
    ledger = ledger_of(out, pg_url)
    try:
        dead = {w.name: w for w in WorkerRecords(ledger).listing()}[f"w{victim}"]
        assert dead.stopped_at is None
        assert dead.taken_over_by in {f"w{i}" for i in range(3) if i != victim}
        assert ledger.counts()["done"] == 120
    finally:
        ledger.close()
    status = run_cli(["status", "--out", str(out), "--ledger", pg_url], None).stdout
    assert f"w{victim} (" in status and f"taken over by {dead.taken_over_by}" in status


def test_the_database_going_away_mid_run_is_a_pause(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """Every connection to PostgreSQL dropped and new ones refused for 3 s while three workers
    are at work (as a restart of the server looks to them): they wait, reconnect and finish,
    with nothing lost and nothing paid twice."""
    emulator = make_emulator(qps_limit=CEILING, queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "nas" / "shoots", tmp_path / "nas" / "retouched"
    sources = shoot(src, 150)
    with DatabaseProxy() as proxy:
        url = proxy.url(pg_url)
        workers = [popen_cli(["run", str(src), "--out", str(out), "--ledger", url,
                              "--worker-name", f"w{i}", "--max-qps", str(CEILING),
                              "--poll-interval", "0.05", "--no-progress", "--lease-seconds",
                              "10"], emulator) for i in range(3)]
        deadline = time.time() + 60
        while emulator.stats.get("charged", 0) < 40 and time.time() < deadline:
            time.sleep(0.01)
        proxy.cut()
        charged_at_cut = emulator.stats["charged"]
        time.sleep(3)
        proxy.restore()
        ended = [worker.communicate(timeout=240) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], ended
    # A worker that met the cut says so once, however many of its threads waited, and says
    # when the database answers again.
    assert any(AWAY in err for _, err in ended)
    assert [err.count(AWAY) <= 1 for _, err in ended] == [True] * 3, ended
    assert [(AWAY in err) == ("answers again" in err)
            for _, err in ended] == [True] * 3, ended
    assert charged_at_cut < 150  # the cut came mid-run
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 150
    assert_ledger_sound(out, pg_url)
    assert sum(uploads_by_worker(out, pg_url).values()) == 150


def _set_read_only(pg_url: str, read_only: bool) -> None:
    """New sessions take no writes (its sessions ended, as a failover to a standby looks to a
    client), or take them again (the sessions opened meanwhile stay read-only: the client
    must drop them)."""
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = '
                              f"{'on' if read_only else 'off'}"))
            if read_only:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :n"), {"n": name})
    finally:
        admin.dispose()


def test_a_ledger_database_that_takes_no_writes_for_a_while_is_a_pause(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """The ledger's server fails over to a standby (read-only) mid-run and back: the worker
    waits, says so once with the cause, and finishes with nothing lost or paid twice."""
    emulator = make_emulator(queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 40)
    worker = popen_cli(["run", str(src), "--out", str(out), "--ledger", pg_url,
                        "--max-qps", "10", "--poll-interval", "0.05", "--no-progress",
                        "--lease-seconds", "30"], emulator)
    assert wait_for(lambda: emulator.stats.get("charged", 0) >= 5, timeout=60)
    _set_read_only(pg_url, True)
    time.sleep(3)
    _set_read_only(pg_url, False)
    _, err = worker.communicate(timeout=180)
    assert worker.returncode == 0, err
    assert "Traceback" not in err and "unexpected error" not in err, err
    assert err.count(AWAY) == 1, err  # one outage (its first error names it), said once
    assert "The ledger database answers again." in err
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, 40, pg_url)
    assert_ledger_sound(out, pg_url)


def test_a_worker_cut_off_from_the_database_longer_than_its_lease_stops_and_says_why(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    emulator = make_emulator(queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 60)
    with DatabaseProxy() as proxy:
        url = proxy.url(pg_url)
        worker = popen_cli(["run", str(src), "--out", str(out), "--ledger", url,
                            "--worker-name", "lonely", "--max-qps", "10", *WORKER_FLAGS],
                           emulator)
        deadline = time.time() + 60
        while emulator.stats.get("charged", 0) < 5 and time.time() < deadline:
            time.sleep(0.01)
        proxy.cut()
        time.sleep(6)  # twice the lease
        proxy.restore()
        _, err = worker.communicate(timeout=120)
    assert worker.returncode == 1, err
    assert "unreachable for longer than the lease (3 s)" in err
    assert emulator.stats["charged"] < 60
    # The next run (the database back) finishes the batch; what the cut left ambiguous is
    # counted as a possible second charge, nothing more.
    again = run_cli(["run", str(src), "--out", str(out), "--ledger", pg_url,
                     "--max-qps", "40", *WORKER_FLAGS], emulator)
    assert again.returncode == 0, again.stderr
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, 60, pg_url)
    assert_ledger_sound(out, pg_url)


def test_a_worker_claims_only_jobs_under_its_own_roots(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """Two sites on one ledger, each with its own shoots: neither takes the other's jobs."""
    emulator = make_emulator()
    site_a, site_b = tmp_path / "a", tmp_path / "b"
    shots_a, shots_b = shoot(site_a / "in", 40), shoot(site_b / "in", 40, first_seed=500)
    workers = [popen_cli(["run", str(site / "in"), "--out", str(site / "out"), "--ledger",
                          pg_url, "--worker-name", name, "--max-qps", "200", *WORKER_FLAGS],
                         emulator) for site, name in ((site_a, "a"), (site_b, "b"))]
    codes = finish(workers)
    if codes != [0, 0]:  # which jobs a worker left unfinished, and how they got there
        print_unfinished(site_a / "out", pg_url)
    assert codes == [0, 0]
    assert_outputs_right(site_a / "out", shots_a, emulator)
    assert_outputs_right(site_b / "out", shots_b, emulator)
    ledger = ledger_of(site_a / "out", pg_url)
    try:
        for job in ledger.jobs_in(list(JobState)):
            [root] = {f.root for f in ledger.files_for_job(job.id)}
            site = "a" if root.startswith(str(site_a.resolve())) else "b"
            assert {e["worker"] for e in ledger.history(job.id)} == {site}
    finally:
        ledger.close()


def test_a_dry_run_on_a_shared_ledger_knows_what_the_batch_has_done(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """A dry run on a PostgreSQL ledger started from an empty one: its estimate counted every
    photo of the source as new (tonight's cost: the whole archive). It works on a private
    copy of the shared ledger's rows, counts only this site's photos, and changes nothing."""
    emulator = make_emulator()
    site_a, site_b = tmp_path / "a", tmp_path / "b"
    shoot(site_a / "in", 3)
    shoot(site_b / "in", 2, first_seed=500)
    for site, extra in ((site_a, []), (site_b, ["--max-credits", "0"])):
        run_cli(["run", str(site / "in"), "--out", str(site / "out"), "--ledger", pg_url,
                 *WORKER_FLAGS, *extra], emulator)
    assert emulator.stats["charged"] == 3
    write_portrait(site_a / "in" / "new.jpg", seed=900)
    dry = run_cli(["run", str(site_a / "in"), "--out", str(site_a / "out"), "--ledger", pg_url,
                   "--dry-run", *WORKER_FLAGS], emulator)
    assert dry.returncode == 0, dry.stderr
    assert "would send:   1 image(s), about 1 credit(s)" in dry.stdout, dry.stdout
    assert "would reject: 0" in dry.stdout and "already done: 3" in dry.stdout, dry.stdout
    assert emulator.stats["charged"] == 3
    ledger = ledger_of(site_a / "out", pg_url)
    try:
        assert ledger.file_count() == 5
    finally:
        ledger.close()


def test_two_live_workers_may_not_share_a_name(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    # Tasks long enough that the first worker is still at work (its lease alive) however long
    # a busy machine takes to start the second one.
    emulator = make_emulator(queue_seconds=1.0, process_seconds=8.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 6)
    first = popen_cli(["run", str(src), "--out", str(out), "--ledger", pg_url,
                       "--worker-name", "studio", *WORKER_FLAGS], emulator)
    deadline = time.time() + 20
    while emulator.stats.get("charged", 0) == 0 and time.time() < deadline:
        time.sleep(0.05)
    second = run_cli(["run", str(src), "--out", str(tmp_path / "out-b"), "--ledger", pg_url,
                      "--worker-name", "studio", *WORKER_FLAGS], emulator)
    assert second.returncode == 2
    assert "already working on this ledger" in second.stderr
    assert finish([first]) == [0]
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 6


@pytest.mark.parametrize("workers", [1, 2])
def test_max_upload_rate_caps_what_each_worker_sends(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str, workers: int) -> None:
    """--max-upload-rate 512k: the server receives the uploads of each worker at that pace at
    most (two workers together at twice it), and every image still arrives whole."""
    emulator = make_emulator(upload_bandwidth=1e9)  # an uplink that records each upload's span
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i, size=(900, 1100), grain=40,
                                          quality=95) for i in range(2 * workers)}
    procs = [popen_cli(["run", str(src), "--out", str(out), "--ledger", pg_url, "--worker-name",
                        f"w{i}", "--max-upload-rate", "512k", "--max-qps", "100",
                        "--concurrency", "3", *WORKER_FLAGS], emulator) for i in range(workers)]
    assert finish(procs) == [0] * workers
    assert_outputs_right(out, sources, emulator)
    spans = emulator.state.upload_spans
    sent = sum(n for _, _, n in spans)
    seconds = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    assert sent > 2 * workers * 300_000  # the cap was measured on uploads of some size
    rate = sent / seconds
    assert rate <= 1.1 * workers * 512 * 1024, (rate, sent, seconds)
    assert rate >= 0.4 * 512 * 1024, (rate, sent, seconds)


def test_max_credits_is_one_number_for_the_whole_batch(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    emulator = make_emulator(queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 40)
    procs = [popen_cli(["run", str(src), "--out", str(out), "--ledger", pg_url, "--worker-name",
                        f"w{i}", "--max-credits", "12", "--max-qps", "100", *WORKER_FLAGS],
                       emulator) for i in range(2)]
    assert finish(procs) == [1, 1]  # the rest wait for the next night's budget
    assert emulator.stats["charged"] == 12
    by_worker = uploads_by_worker(out, pg_url)
    assert sum(by_worker.values()) == 12
    ledger = ledger_of(out, pg_url)
    try:
        assert ledger.counts()["done"] == 12 and ledger.counts()["pending"] == 28
        waiting = [p for p in ledger.problems() if p.reason.startswith("not sent: budget")]
        assert len(waiting) == 28
    finally:
        ledger.close()
    # The next night's batch opens its own budget.
    again = run_cli(["run", str(src), "--out", str(out), "--ledger", pg_url, "--max-credits",
                     "100", "--max-qps", "100", *WORKER_FLAGS], emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats["charged"] == 40
    assert_outputs_right(out, sources, emulator)


def test_a_worker_started_with_other_options_is_refused_while_the_batch_runs(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """A second machine joins with other options (its config file lacks one): it is refused
    before it sends anything, as each set would pay for every photo of the batch; once the
    batch's workers have ended, a run with new options is the usual change of options."""
    # Results take 8 s: "a" is at work for at least that long after its third upload.
    emulator = make_emulator(queue_seconds=0.2, process_seconds=8)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 12)
    first = popen_cli(["run", str(src), "--out", str(out), "--ledger", pg_url, "--worker-name",
                       "a", "--smart-skin", "--acne-removal", "--max-qps", "4", *WORKER_FLAGS],
                      emulator)
    assert wait_for(lambda: emulator.stats.get("charged", 0) >= 3, timeout=60)
    refusal = ("The workers on this ledger retouch with smart_skin, acne_removal; this one was "
               "started with smart_skin.")
    b = ["run", str(src), "--out", str(out), "--ledger", pg_url, "--worker-name", "b",
         "--smart-skin", *WORKER_FLAGS]
    dry = run_cli([*b, "--dry-run"], emulator)
    assert f"The run would be refused: {refusal}" in dry.stdout, dry.stdout + dry.stderr
    second = run_cli(b, emulator)
    assert second.returncode == 2, second.stderr
    assert refusal in second.stderr, second.stderr
    assert finish([first]) == [0]
    assert uploads_by_worker(out, pg_url) == {"a": 12}
    assert emulator.stats["charged"] == 12
    assert_outputs_right(out, sources, emulator)
    quick = make_emulator(queue_seconds=0.2, process_seconds=0.2)  # the same API, faster
    later = run_cli(["run", str(src), "--out", str(out), "--ledger", pg_url, "--worker-name",
                     "b", "--smart-skin", "--pay-again", "--max-qps", "100", *WORKER_FLAGS],
                    quick)
    assert later.returncode == 0, later.stderr
    assert "retouched before under other options" in later.stderr
    assert quick.stats["charged"] == 12 and emulator.stats["charged"] == 12


def test_a_tree_mounted_at_different_paths_is_one_root_by_its_name(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """Two machines see one NAS at /mnt/nas/shoots and /Volumes/shoots (here: two copies of
    one tree): each maps the name "shoots" to its own path, so the ledger holds one file row
    per photo under "@shoots", the work is shared, and nothing is paid twice."""
    emulator = make_emulator(queue_seconds=0.2, process_seconds=0.4)
    mount_a, mount_b, out = tmp_path / "a" / "shoots", tmp_path / "b" / "shoots", tmp_path / "out"
    sources = shoot(mount_a, 60)
    shutil.copytree(mount_a, mount_b)
    procs = [popen_cli(["run", str(mount), "--out", str(out), "--ledger", pg_url,
                        "--root", f"shoots={mount}", "--worker-name", name, "--max-qps", "100",
                        *WORKER_FLAGS], emulator)
             for mount, name in ((mount_a, "a"), (mount_b, "b"))]
    assert finish(procs) == [0, 0]
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 60
    ledger = ledger_of(out, pg_url)
    try:
        assert ledger.file_count() == 60
        assert {f.root for job in ledger.jobs_in(list(JobState))
                for f in ledger.files_for_job(job.id)} == {"@shoots"}
    finally:
        ledger.close()
    assert sum(uploads_by_worker(out, pg_url).values()) == 60
    # A machine that names no "shoots" never takes those jobs: with nothing of its own to do,
    # it exits at once having sent nothing.
    other = tmp_path / "c" / "own"
    own = shoot(other, 3, first_seed=900)
    alone = run_cli(["run", str(other), "--out", str(tmp_path / "out-c"), "--ledger", pg_url,
                     "--max-qps", "100", *WORKER_FLAGS], emulator)
    assert alone.returncode == 0, alone.stderr
    assert emulator.stats["charged"] == 63
    assert_outputs_right(tmp_path / "out-c", own, emulator)


def test_retry_finds_photos_by_this_machines_path_of_a_named_tree(
        tmp_path: Path, emulator: Emulator, pg_url: str) -> None:
    """On a shared ledger the files of a named tree are recorded under its name: retry finds a
    folder of them by this machine's path given with the same --root, and says nothing
    matched without it."""
    mount, out = tmp_path / "mnt" / "shoots", tmp_path / "out"
    shoot(mount, 3)
    for folder in ("s0", "s1"):
        (mount / folder).mkdir(exist_ok=True)
        (mount / folder / "broken.jpg").write_text(f"{folder}: not a photo yet")
    root = ["--root", f"shoots={mount}"]
    first = run_cli(["run", str(mount), "--out", str(out), "--ledger", pg_url, *root,
                     "--smart-skin", "--max-qps", "100", *WORKER_FLAGS], emulator)
    assert first.returncode == 1, first.stderr
    unnamed = run_cli(["retry", "--out", str(out), "--ledger", pg_url, "--rejected",
                       str(mount / "s0")], None)
    assert unnamed.returncode == 1 and "nothing was put back in line" in unnamed.stderr
    named = run_cli(["retry", "--out", str(out), "--ledger", pg_url, *root, "--rejected",
                     str(mount / "s0")], None)
    assert named.returncode == 0 and "1 job(s) put back in line" in named.stdout, named.stderr
    ledger = ledger_of(out, pg_url)
    try:
        assert ledger.counts()["pending"] == 1 and ledger.counts()["rejected"] == 1
    finally:
        ledger.close()


def _restart_postgresql() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.restarts_postgresql
@pytest.mark.skipif(not shutil.which("pg_ctlcluster") or os.geteuid() != 0,
                    reason="restarts the machine's PostgreSQL server (root, Debian's tools)")
def test_a_real_postgresql_restart_mid_run_is_a_pause(
        tmp_path: Path, make_emulator: MakeEmulator, pg_url: str) -> None:
    """The server itself restarted (not a proxy) under three workers: they wait, reconnect and
    finish. No other test uses the server meanwhile (the ``restarts_postgresql`` mark)."""
    emulator = make_emulator(qps_limit=CEILING, queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "nas" / "shoots", tmp_path / "nas" / "retouched"
    sources = shoot(src, 150)
    workers = [popen_cli(["run", str(src), "--out", str(out), "--ledger", pg_url,
                          "--worker-name", f"w{i}", "--max-qps", str(CEILING), "--poll-interval",
                          "0.05", "--no-progress", "--lease-seconds", "20"], emulator)
               for i in range(3)]
    deadline = time.time() + 60
    while emulator.stats.get("charged", 0) < 40 and time.time() < deadline:
        time.sleep(0.01)
    _restart_postgresql()
    ended = [worker.communicate(timeout=240) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], ended
    assert any(AWAY in err for _, err in ended)
    assert [err.count(AWAY) <= 1 for _, err in ended] == [True] * 3, ended
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 150
    assert_ledger_sound(out, pg_url)
