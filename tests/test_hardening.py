"""Ambiguous uploads, the circuit breaker, the run lock, ledger placement."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from batch.api.breaker import CircuitBreaker
from batch.emulator import Emulator, Faults
from batch.ledger.engine import filesystem_type
from tests.checks import assert_no_double_pay, assert_outputs_right, closed_port, ledger_of
from tests.conftest import FAST_FLAGS, MakeEmulator, popen_cli, run_cli, wait_for
from tests.imagegen import write_portrait


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_a_run_of_failures_probes_and_backs_off(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "batch.breaker")
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown=10, max_cooldown=25, clock=clock)
    for _ in range(2):
        assert breaker.delay() == 0.0
        breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and breaker.delay() == 10
    clock.now = 10
    assert breaker.delay() == 0.0          # the probe
    assert breaker.delay() is None         # nobody else while it is out
    breaker.failure()                      # probe failed: pause doubles
    assert breaker.delay() == 20
    clock.now = 30
    assert breaker.delay() == 0.0
    breaker.failure()
    assert breaker.delay() == 25           # capped
    clock.now = 55
    assert breaker.delay() == 0.0
    breaker.failure("could not connect")   # at the cap: a night-long outage is not mailed
    assert breaker.delay() == 25           # every few minutes by cron
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "The API failed 3 times in a row; pausing uploads for 10 s."),
        ("WARNING", "The API failed 4 times in a row; pausing uploads for 20 s."),
        ("WARNING", "The API failed 5 times in a row; pausing uploads for 25 s."),
        ("INFO", "The API failed 6 times in a row (the last: could not connect); pausing "
                 "uploads for 25 s.")]
    clock.now = 80
    assert breaker.delay() == 0.0
    breaker.success()
    assert breaker.state == "closed" and breaker.delay() == 0.0


def sick_api_run(tmp_path: Path, make_emulator: MakeEmulator,
                 extra_config: str = "") -> tuple[Emulator, list[str]]:
    """Ten photos against an API that answers every upload 503, with a breaker that opens
    after three failures and then holds uploads back for 90 s: the emulator and the run's
    arguments."""
    emulator = make_emulator(faults=Faults(submit_5xx=1.0))
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(10):
        write_portrait(src / f"{i}.jpg", seed=i)
    config = tmp_path / "c.toml"
    config.write_text("breaker_threshold = 3\nbreaker_cooldown = 90.0\nbackoff_base = 0.01\n"
                      "backoff_cap = 0.02\nmax_attempts = 50\n" + extra_config)
    return emulator, ["run", str(src), "--out", str(out), "--config", str(config),
                      "--concurrency", "2", *FAST_FLAGS]


def test_a_sick_api_is_not_hammered(tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator, args = sick_api_run(tmp_path, make_emulator, "interrupt_grace = 60.0\n")
    proc = popen_cli(args, emulator)
    time.sleep(3)
    proc.terminate()
    # The uploads waiting out the breaker's cooldown were never sent: the run ends without
    # waiting out the grace that uploads under way get.
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    # 3 failures open the breaker; at most the other upload already under way gets through.
    assert emulator.stats["submits"] <= 4, emulator.stats


def test_uploads_stopped_by_the_clock_during_an_outage_end_the_run_at_once(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """The breaker holds uploads back for a long cooldown when --stop-submitting-at comes:
    those uploads will not be sent, so the run ends then (nothing paid is in flight) rather
    than when the cooldown would have let them through."""
    emulator, args = sick_api_run(tmp_path, make_emulator)
    result = run_cli([*args, "--stop-submitting-at", "3s"], emulator, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "stop-submitting time reached" in result.stderr
    # The log of an unattended night says what failed: an API answering 5xx, not a network down.
    paused = next(line for line in result.stderr.splitlines() if "times in a row" in line)
    assert "The API failed 3 times in a row (the last: the API answered HTTP 50" in paused, paused
    assert emulator.stats["submits"] <= 4, emulator.stats
    assert emulator.stats.get("charged", 0) == 0
    # The morning reads why the photos wait: the outage, not only the stop time that ended it.
    assert "Meanwhile the API failed every try since " in result.stderr
    assert_waiting_for_the_api(args)


def assert_waiting_for_the_api(args: list[str]) -> None:
    """``status`` of the run's --out lists each of its ten photos as not sent, with the
    outage that kept it back."""
    status = run_cli(["status", "--out", args[args.index("--out") + 1]], None)
    waiting = [line for line in status.stdout.splitlines() if line.startswith("  pending")]
    assert len(waiting) == 10, status.stdout
    assert all("; the API failed every try since " in line
               and "(the last: the API answered HTTP 50" in line for line in waiting), waiting


def test_a_night_the_api_cannot_be_reached_fails_no_photo(tmp_path: Path) -> None:
    """No connection can be made (the line down, the port closed): however many tries the
    breaker lets through, none counts against a photo's attempts, so none ends failed (the
    next night would leave it for a person to put back); the deadline leaves them all
    waiting, with why."""
    port = closed_port()
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        write_portrait(src / f"{i}.jpg", seed=i)
    config = tmp_path / "c.toml"
    # One attempt each: a try that counted would fail the photo at once. (The deadline
    # leaves room for the balance's four reads, up to 7 s, which the first upload waits for.)
    config.write_text("breaker_threshold = 2\nbreaker_cooldown = 0.2\nmax_attempts = 1\n")
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config),
                      "--deadline", "12s", *FAST_FLAGS], None,
                     extra_env={"AILAB_API_BASE": f"http://127.0.0.1:{port}"}, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "The API failed 2 times in a row (the last: could not connect" in result.stderr
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert {k: n for k, n in status["counts"].items() if n} == {"pending": 6}, status["counts"]
    assert all("could not connect to the API" in p["reason"] for p in status["problems"])


def test_an_api_outage_that_outlasts_the_attempts_fails_no_photo(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """The API's gateway answers everything 502 for longer than the attempts the breaker
    spaces out: a photo at its attempt limit was failed, for a person to put back the next
    morning. Now, the balance failing too, it is tried on, and sent once the API is back. A
    photo whose upload fails while the API answers its balance fails at the limit, and the
    next run tries it once more (its backend may have been out behind a gateway that
    answers); failing again there, it is left for a person."""
    emulator = make_emulator(faults=Faults(submit_5xx=1.0, credits_5xx=1.0))
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(4)}
    config = tmp_path / "c.toml"
    # One attempt each: a try that counted would fail the photo at once.
    config.write_text("breaker_threshold = 2\nbreaker_cooldown = 0.2\nmax_attempts = 1\n"
                      "backoff_base = 0.01\nbackoff_cap = 0.02\n")
    args = ["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS]
    proc = popen_cli(args, emulator)
    try:
        # Tries past the limit (or a run that failed its photos, and has ended).
        assert wait_for(lambda: emulator.stats.get("submits", 0) >= 6 or proc.poll() is not None,
                        timeout=60)
        emulator.config.faults.submit_5xx = 0.0
        # The balance fails on until every photo is sent: an upload answered 502 just before
        # is judged at its limit while the API is still out, as it was.
        assert wait_for(lambda: emulator.stats.get("charged", 0) >= 4 or proc.poll() is not None,
                        timeout=60)
    finally:
        emulator.config.faults.submit_5xx = emulator.config.faults.credits_5xx = 0.0
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert emulator.stats["charged"] == 4
    assert_outputs_right(out, sources, emulator)

    # The API up, its uploads failing: the photo fails at the limit, and the next run tries
    # it once more (its backend was out while the gateway in front answered the balance).
    emulator.config.faults.submit_5xx = 1.0
    sources["later.jpg"] = write_portrait(src / "later.jpg", seed=9)
    alone = run_cli(args, emulator)
    assert alone.returncode == 1, alone.stdout
    assert "gave up after 1 attempts (the next run tries it once more)" in alone.stdout
    emulator.config.faults.submit_5xx = 0.0
    back = run_cli(args, emulator)
    assert back.returncode == 0, back.stdout + back.stderr
    assert emulator.stats["charged"] == 5
    assert_outputs_right(out, sources, emulator)

    # A photo the API fails each time is tried in two runs, then left for a person.
    emulator.config.faults.submit_5xx = 1.0
    write_portrait(src / "poison.jpg", seed=10)
    assert run_cli(args, emulator).returncode == 1
    twice = run_cli(args, emulator)
    assert twice.returncode == 1
    assert "gave up after 1 attempts (given up in an earlier run too)" in twice.stdout
    emulator.config.faults.submit_5xx = 0.0
    submits = emulator.stats["submits"]
    left = run_cli(args, emulator)
    assert left.returncode == 1 and "poison.jpg" in left.stdout, left.stdout
    assert emulator.stats["submits"] == submits and emulator.stats["charged"] == 5


def test_a_deadline_during_an_outage_says_what_kept_the_photos_back(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Nothing was paid for: the end of the run says so and names the outage; it counts no
    paid job in flight and names no link's expiry."""
    emulator, args = sick_api_run(tmp_path, make_emulator)
    result = run_cli([*args, "--deadline", "3s"], emulator, timeout=60)
    assert result.returncode == 1, result.stderr
    assert ("Deadline reached: nothing paid is in flight; the photos not sent wait for the "
            "next run. Meanwhile the API failed every try since ") in result.stderr
    assert "n/a" not in result.stderr and "paid job(s) still in flight" not in result.stderr
    assert emulator.stats.get("charged", 0) == 0
    assert_waiting_for_the_api(args)


def test_a_read_timeout_after_upload_is_ambiguous_not_retried_blindly(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(faults=Faults(stall=1.0, stall_seconds=1.5))
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {"a.jpg": write_portrait(src / "a.jpg")}
    config = tmp_path / "c.toml"
    config.write_text('submit_timeout = 0.5\non_ambiguous = "hold"\n')
    args = ["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS]
    held = run_cli(args, emulator)
    assert held.returncode == 1
    assert "ambiguous" in held.stdout
    time.sleep(1.5)
    assert emulator.stats["charged"] == 1, "the server did charge for the upload it got"
    assert emulator.stats["submits"] == 1, "no blind retry of an upload that went out"
    status = run_cli(["status", "--out", str(out)], None)
    assert "ambiguous" in status.stdout and "may have charged" in status.stdout

    emulator.config.faults.stall = 0.0
    again = run_cli(args, emulator)
    assert again.returncode == 1, "held jobs wait for a person"
    assert emulator.stats["submits"] == 1
    retry = run_cli(["retry", "--out", str(out), "--ambiguous"], None)
    assert retry.returncode == 0 and "1 job(s)" in retry.stdout
    final = run_cli(args, emulator)
    assert final.returncode == 0, final.stdout + final.stderr
    assert_outputs_right(out, sources, emulator)
    assert assert_no_double_pay(out, emulator, 1) == 1


def test_a_second_run_on_the_same_ledger_exits_at_once(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(queue_seconds=1.0, process_seconds=1.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(4)}
    args = ["run", str(src), "--out", str(out), *FAST_FLAGS]
    first = popen_cli(args, emulator)
    deadline = time.time() + 20
    while emulator.stats.get("charged", 0) == 0 and time.time() < deadline:
        time.sleep(0.05)
    # The first run is held where it is (as the OS may pause a process), so that it is still
    # at work when the second one starts, however long a busy machine takes to start that.
    first.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        second = run_cli(args, emulator)
        waited = time.monotonic() - started
        # A retry meanwhile works beside the run (nothing failed: nothing moves).
        retry = run_cli(["retry", "--out", str(out), "--failed"], emulator)
    finally:
        first.send_signal(signal.SIGCONT)
    assert waited < 10
    assert second.returncode == 2
    assert "Another skinbatch run" in second.stderr
    assert retry.returncode == 1 and "nothing was put back in line" in retry.stderr, retry
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 4


def test_a_damaged_ledger_is_refused_before_anything_is_sent(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A ledger file with a damaged page (power lost mid-write on a USB disk, a bad sector)
    ran the night into a traceback, and `status` too. It is refused by every command, with
    what to do, and left as it is: it is the record of what was paid for."""
    emulator = make_emulator()
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        write_portrait(src / f"{i}.jpg", seed=i)
    args = ["run", str(src), "--out", str(out), *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 0
    write_portrait(src / "new.jpg", seed=9)
    path = out / ".skinbatch" / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'files'").fetchone()[0]
    damaged = bytearray(path.read_bytes())
    damaged[(root - 1) * page_size:root * page_size] = b"\xa5" * page_size
    path.write_bytes(damaged)
    for command in (args, [*args, "--dry-run"], ["status", "--out", str(out)],
                    ["report", "--out", str(out)]):
        result = run_cli(command, emulator)
        assert result.returncode == 2, (command, result.stderr)
        assert f"the ledger {path} is damaged" in result.stderr, result.stderr
        assert "sqlite3 LEDGER .recover" in result.stderr and "Traceback" not in result.stderr
    assert emulator.stats["charged"] == 3 and len(emulator.state.tasks) == 3
    assert path.read_bytes() == damaged


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
server:/export /mnt/studio nfs4 rw,relatime 0 0
//nas/photos /mnt/nas cifs rw 0 0
"""


def test_network_filesystems_are_recognised() -> None:
    assert filesystem_type(Path("/mnt/studio/ledgers"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/mnt/nas"), MOUNTS) == "cifs"
    assert filesystem_type(Path("/home/me"), MOUNTS) == "ext4"


def test_ledger_rows_stay_legal(tmp_path: Path, emulator: Emulator) -> None:
    from batch.states import JobState, check_transition
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        write_portrait(src / f"{i}.jpg", seed=i)
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    ledger = ledger_of(out)
    for job in ledger.jobs_in(list(JobState)):
        for event in ledger.history(job.id):
            check_transition(job.id, event["from_state"], JobState(event["to_state"]))
    ledger.close()
    assert_no_double_pay(out, emulator, 3)


def test_more_open_tasks_than_the_poll_window_all_finish(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """The poller keeps a window of open tasks in memory; the rest wait in the ledger and are
    taken in, oldest first, as the window frees up. Nothing is left behind."""
    emulator = make_emulator(queue_seconds=0.3, process_seconds=0.3, jitter=0.5)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(16)}
    config = tmp_path / "c.toml"
    config.write_text("poll_window = 3\n")
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config),
                      "--concurrency", "8", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 16


def test_a_max_qps_above_the_servers_limit_settles_under_it_after_a_429_or_two(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """--max-qps set four times what the server takes: the first 429s show the server's limit
    and the run paces under it, instead of running into it after every pause."""
    emulator = make_emulator(qps_limit=15.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(60)}
    flags = ["--poll-interval", "0.2", "--max-qps", "60", "--concurrency", "8", "--no-progress"]
    result = run_cli(["run", str(src), "--out", str(out), *flags], emulator)
    assert result.returncode == 0, result.stderr
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, len(sources))
    # The pace drops once a second, so what went out at the old pace before the cut is
    # refused too: a handful. Going back to the ceiling after every pause would be refused
    # again each time, several times as many.
    assert 1 <= emulator.stats["rate_limited"] <= 8, emulator.stats
    assert "pacing at" in result.stderr and "--max-qps is 60" in result.stderr
