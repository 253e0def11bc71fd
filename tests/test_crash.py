"""SIGKILL at named points (right after a committed transition), then a clean rerun."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batch.emulator import Emulator
from tests import slowdisk
from tests.checks import (
    assert_ledger_sound,
    assert_no_double_pay,
    assert_outputs_right,
    ledger_of,
)
from tests.conftest import (
    FAST_FLAGS,
    MakeEmulator,
    cli_env,
    popen_cli,
    run_cli,
    stopped,
    wait_for,
)
from tests.imagegen import write_portrait

POINTS = ["submitting:3", "answered:2", "queued:4", "processing:2", "ready:3", "downloading:2",
          "downloaded:2", "done:5"]


def tree(src: Path, n: int) -> dict[str, bytes]:
    return {f"set {i % 3}/{i:03d}.jpg": write_portrait(src / f"set {i % 3}/{i:03d}.jpg", seed=i)
            for i in range(n)}


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_transition_then_rerun(tmp_path: Path, make_emulator: MakeEmulator,
                                               point: str) -> None:
    # Tasks that take a while, so polls see them processing (the poller aims its first
    # query near the finish and would otherwise skip that state).
    emulator = make_emulator(process_seconds=1.0) if point.startswith("processing") \
        else make_emulator()
    kill_at_then_rerun(tmp_path, emulator, point)


@pytest.mark.parametrize("point", ["submitting:3", "answered:2", "queued:4", "done:5"])
def test_kill_9_on_a_slow_disk_then_rerun(
        tmp_path: Path, make_emulator: MakeEmulator, slow_disk: dict[str, str],
        point: str) -> None:
    """On a slow disk the ledger's writer thread commits several of the stages' writes to a
    transaction: a kill right after such a commit loses nothing either."""
    kill_at_then_rerun(tmp_path, make_emulator(), point, slow_disk)


@pytest.mark.postgres
@pytest.mark.parametrize("point", ["answered:2", "queued:4", "done:5"])
def test_kill_9_with_a_postgresql_ledger_then_rerun(tmp_path: Path, make_emulator: MakeEmulator,
                                                     pg_url: str, point: str) -> None:
    """The whole run against a PostgreSQL ledger (--ledger URL), killed and run again."""
    kill_at_then_rerun(tmp_path, make_emulator(), point, ledger=pg_url)
    status = run_cli(["status", "--out", str(tmp_path / "out"), "--ledger", pg_url, "--json"],
                     None)
    assert status.returncode == 0 and json.loads(status.stdout)["counts"]["done"] == 10


def kill_at_then_rerun(tmp_path: Path, emulator: Emulator, point: str,
                       extra_env: dict[str, str] | None = None, ledger: str | None = None) -> str:
    """SIGKILL right after ``point``, then a clean rerun; returns the killed run's stderr."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = tree(src, 10)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    if ledger is not None:
        args += ["--ledger", ledger]
    crashed = popen_cli(args, emulator,
                        extra_env={**(extra_env or {}), "SKINBATCH_CRASH_AFTER": point})
    _, stderr = crashed.communicate(timeout=120)
    assert crashed.returncode == -signal.SIGKILL, f"{point} was never reached: {stderr[-3000:]}"

    rerun = run_cli(args, emulator, extra_env=extra_env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    if ledger is None:  # one run at a time: said in a studio's words, not a shared ledger's
        assert "ended without finishing" in rerun.stderr and "lease" not in rerun.stderr
    assert_outputs_right(out, sources, emulator)
    ambiguous = assert_no_double_pay(out, emulator, len(sources), ledger)
    if point == "answered:2":
        assert ambiguous >= 1, "a charged upload whose answer was lost must be recorded"
    assert assert_ledger_sound(out, ledger)["done"] == len(sources)
    return stderr


@pytest.mark.parametrize(("images", "kills"), [
    (50, 10), pytest.param(500, 50, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments(tmp_path: Path, make_emulator: MakeEmulator, images: int,
                                  kills: int) -> None:
    random_kills(tmp_path, make_emulator, images, kills)


def test_kill_9_at_random_moments_while_writes_are_batched(
        tmp_path: Path, make_emulator: MakeEmulator, slow_disk: dict[str, str]) -> None:
    """On a slow disk the ledger's writes are committed several to a transaction by a thread
    of their own: kills land mid-batch too."""
    random_kills(tmp_path, make_emulator, 30, 8, slow_disk)


def random_kills(tmp_path: Path, make_emulator: MakeEmulator, images: int, kills: int,
                 extra_env: dict[str, str] | None = None) -> None:
    emulator = make_emulator(queue_seconds=0.5, process_seconds=1.0, jitter=0.5)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = tree(src, images)
    originals = {p: p.read_bytes() for p in src.rglob("*.jpg")}
    # Paced (QPS cap, slower polls) so the kills land all along the run, not after it.
    args = ["run", str(src), "--out", str(out), "--concurrency", "6", *FAST_FLAGS,
            "--max-qps", "10" if images <= 50 else "8", "--poll-interval", "0.3"]
    rng = random.Random(images)
    survived = 0
    for _ in range(kills):
        proc = popen_cli(args, emulator, extra_env=extra_env)
        time.sleep(rng.uniform(0.6, 2.0))
        if proc.poll() is None:
            proc.kill()
            survived += 1
        proc.communicate(timeout=60)
    final = run_cli(args, emulator, timeout=600, extra_env=extra_env)
    assert final.returncode == 0, final.stdout + final.stderr
    assert survived >= kills // 2
    assert_outputs_right(out, sources, emulator)
    ambiguous = assert_no_double_pay(out, emulator, len(sources))
    sound = assert_ledger_sound(out)
    assert sound["done"] == len(sources)
    assert {p: p.read_bytes() for p in src.rglob("*.jpg")} == originals
    print(f"\nrandom kills: images={images} kills={survived} charged={emulator.stats['charged']} "
          f"ambiguous={ambiguous} transitions={sound['transitions']}")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_saves_state_and_exits_130(tmp_path: Path, make_emulator: MakeEmulator,
                                          stop: signal.Signals) -> None:
    """Ctrl-C, a service stopped, the terminal or SSH session closed (SIGHUP): uploads under
    way get their answer, so none is left ambiguous (and paid again by the next run)."""
    emulator = make_emulator(queue_seconds=0.5, process_seconds=1.0,
                             upload_bandwidth=400_000)  # uploads under way at the signal
    src, out = tmp_path / "src", tmp_path / "out"
    sources = tree(src, 8)
    args = ["run", str(src), "--out", str(out), *FAST_FLAGS]
    proc = popen_cli(args, emulator)
    deadline = time.time() + 30
    while emulator.stats.get("charged", 0) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "run the same command again" in stderr
    rerun = run_cli(args, emulator)
    assert rerun.returncode == 0
    assert "left unfinished" not in rerun.stderr, rerun.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == len(sources)


@pytest.mark.parametrize(("command", "stop", "late"), [
    ("run", signal.SIGINT, False), ("run", signal.SIGTERM, False), ("run", None, False),
    ("watch", signal.SIGTERM, False), ("watch", signal.SIGTERM, True)])
def test_a_stop_during_the_scan_of_a_large_folder_does_not_wait_for_it(
        tmp_path: Path, emulator: Emulator, slowdisk_library: Path, command: str,
        stop: signal.Signals | None, late: bool) -> None:
    """One folder holding a whole shoot on a slow share: a first run's, a watch's backlog, or
    moved into a watched folder (``late``). Uploads start with the first photos read, and
    Ctrl-C, a service stopped (systemd kills what is still there after its timeout) or the
    deadline (None) do not wait for every photo there to be read, which takes as long as the
    photos are many and large. A run says its scan was cut short, and so does `status` until a
    scan ends. What was read is kept; the same command reads the rest and pays for each photo
    once."""
    src, out, card = tmp_path / "share", tmp_path / "out", tmp_path / "card"
    # Many more than a stop leaves read: a signal comes with the first upload, the deadline
    # after seconds of reading.
    sources = {f"shoot/{i:03d}.jpg": write_portrait(card / f"{i:03d}.jpg", seed=i)
               for i in range(150 if stop is not None else 400)}
    sources["first.jpg"] = write_portrait(src / "first.jpg", seed=999)
    if not late:
        card.rename(src / "shoot")
    flags = ["--settle", "0.3", "--rescan", "0.5"] if command == "watch" else []
    if stop is None:
        flags = ["--deadline", "4s", "--no-progress"]
    proc = popen_cli([command, str(src), "--out", str(out), *flags, *FAST_FLAGS], emulator,
                     extra_env=slowdisk.slow_reads(slowdisk_library, src, 200_000))
    if late:  # once the watch's first scan is over: its first photo is sent
        assert wait_for(lambda: emulator.stats.get("submits", 0) >= 1)
        card.rename(src / "shoot")  # the card's copy moved in at once
    if stop is not None:
        assert wait_for(lambda: emulator.stats.get("submits", 0) >= 1 + late)
        proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (1 if stop is None else 130), stdout + stderr
    if command == "run":  # a watch's summary counts the passes it finished
        assert "the scan was cut short: the next run looks at the rest" in stdout, stdout
    if stop is None:  # at the deadline, among the run's problems
        assert f"unscanned {src.resolve()}: its last scan was cut short" in stdout, stdout
    ledger = ledger_of(out)
    try:
        read = ledger.file_count()
    finally:
        ledger.close()
    assert 0 < read < len(sources) // 2, f"{read} of {len(sources)} photos read at the stop"
    # The morning's status does not pass the photos not looked at off as all there is.
    status = run_cli(["status", "--out", str(out)], None)
    assert f"unscanned {src.resolve()}: its last scan was cut short" in status.stdout, \
        status.stdout
    assert "file(s) need attention" not in status.stdout  # a source is not a file
    rerun = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "cut short" not in rerun.stdout
    assert "unscanned" not in run_cli(["status", "--out", str(out)], None).stdout
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == len(sources)


def test_ctrl_c_stops_a_dry_run_of_a_large_folder_at_once(
        tmp_path: Path, emulator: Emulator, slowdisk_library: Path) -> None:
    """A dry run reads every new photo, as the run would: on a slow share, Ctrl-C ends it at
    the photos being read, not once every photo queued is, and it says no more than that
    (a dry run saves nothing)."""
    src = tmp_path / "share"
    shoot = [write_portrait(src / f"{i:04d}.jpg", seed=i) for i in range(50)]
    for i in range(50, 2000):  # a shoot's worth: copies are read as any photo is
        (src / f"{i:04d}.jpg").write_bytes(shoot[i % 50])
    proc = popen_cli(["run", str(src), "--out", str(tmp_path / "out"), "--dry-run",
                      *FAST_FLAGS], emulator,
                     extra_env=slowdisk.slow_reads(slowdisk_library, src, 100_000))
    time.sleep(8)  # the scan under way, hundreds of photos queued to be read
    proc.send_signal(signal.SIGINT)
    stopped_at = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    # Reading the photos queued takes about as long again as the scan has run; the reads
    # under way end within 0.1 s.
    assert time.monotonic() - stopped_at < 4, stderr
    assert proc.returncode == 130 and stderr.endswith("skinbatch: interrupted.\n"), stderr
    assert not (tmp_path / "out").exists()


def test_a_run_started_with_nohup_outlives_its_terminal(tmp_path: Path,
                                                        emulator: Emulator) -> None:
    """nohup (SIGHUP ignored) means: carry on when the terminal closes."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = tree(src, 4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch", "run", str(src), "--out", str(out), *FAST_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(emulator),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert wait_for(lambda: emulator.stats.get("submits", 0) >= 1)
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert_outputs_right(out, sources, emulator)


def test_the_morning_report_after_a_run_was_killed_says_so(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A night killed outright (a power cut, the kernel out of memory) records no end: the
    morning report says the last run ended without finishing, where it showed the night
    before's run, exit code 0, as the last one. A run under way is said to be under way, and
    once a run finishes the report is as before. Every run is counted."""
    emulator = make_emulator(process_seconds=1.0)
    src, out = tmp_path / "src", tmp_path / "out"
    tree(src, 3)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 0
    for i in range(3, 8):
        write_portrait(src / f"{i:03d}.jpg", seed=i)
    killed = popen_cli(args, emulator, extra_env={"SKINBATCH_CRASH_AFTER": "queued:2"})
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL

    def report() -> tuple[dict[str, Any], str]:
        for fmt in ("json", "html"):
            assert run_cli(["report", "--out", str(out), "--format", fmt], None).returncode == 0
        return (json.loads((out / "skinbatch-report.json").read_text()),
                (out / "skinbatch-report.html").read_text())

    data, page = report()
    note = data["last_run_unfinished"]
    assert isinstance(note, str) and "ended without finishing" in note, data
    assert "Run the same command again to carry on." in note and note in page.replace(
        "&#x27;", "'")
    assert "Last finished run:" in page and data["batch"]["runs"] == 2

    watching = popen_cli(["watch", *args[1:]], emulator)  # a run that stays under way
    try:
        # Once the watch has started (the killed run may have left it nothing to send).
        assert wait_for(lambda: str(report()[0]["last_run_unfinished"]).startswith(
            "A run is under way: it started "), timeout=60)
    finally:
        stopped(watching)
    assert run_cli(args, emulator).returncode == 0
    data, page = report()
    assert data["last_run_unfinished"] is None and "unfinished-run" not in page
    assert "Last run:" in page and data["batch"]["runs"] == 4
    assert_outputs_right(out, {**tree(src, 3), **{f"{i:03d}.jpg": (src / f"{i:03d}.jpg")
                                                  .read_bytes() for i in range(3, 8)}},
                         emulator)


def test_a_dry_run_after_a_kill_mid_upload_counts_the_upload_sent_again(
        tmp_path: Path, emulator: Emulator) -> None:
    """Killed between an upload's charge and the record of its answer, a run leaves a photo
    whose upload may have been paid: the next run sends it again (``on_ambiguous =
    resubmit``), paid again, and its dry run says so in the credits it counts."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = tree(src, 3)
    args = ["run", str(src), "--out", str(out), "--smart-skin", "--concurrency", "1",
            *FAST_FLAGS]
    killed = popen_cli(args, emulator, extra_env={"SKINBATCH_CRASH_AFTER": "answered:1"})
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL and emulator.stats["charged"] == 1
    assert run_cli(["report", "--out", str(out), "--format", "json"], None).returncode == 0
    [attention] = json.loads((out / "skinbatch-report.json").read_text())["needs_attention"]
    assert attention["why"].startswith("uploaded, its answer not recorded"), attention
    dry = run_cli([*args, "--dry-run"], emulator)
    assert "would send:   3 image(s), about 3 credit(s)" in dry.stdout, dry.stdout
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats["charged"] == 1 + 3
    assert_outputs_right(out, sources, emulator)


def test_a_dry_run_beside_a_run_under_way_counts_its_uploads_in_flight(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """In the morning the nightly run is still at work and someone asks what is left: the
    uploads it has under way are in flight, not answers lost to be paid for again, and the
    dry run says that a run is at work (a run started now would be refused)."""
    emulator = make_emulator(answer_seconds=15.0)  # two uploads charged, their answers slow
    src, out = tmp_path / "src", tmp_path / "out"
    sources = tree(src, 6)
    args = ["run", str(src), "--out", str(out), "--smart-skin", "--concurrency", "2",
            *FAST_FLAGS]
    proc = popen_cli(args, emulator)
    try:
        assert wait_for(lambda: emulator.stats.get("charged", 0) == 2)
        dry = run_cli([*args, "--dry-run"], emulator)
    finally:
        emulator.config.answer_seconds = 0.0
    assert "would send:   4 image(s), about 4 credit(s)" in dry.stdout, dry.stdout
    assert "in flight or waiting: 2" in dry.stdout, dry.stdout
    assert "A run is under way on this ledger (started " in dry.stdout, dry.stdout
    assert f"pid {proc.pid} on " in dry.stdout, dry.stdout
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert emulator.stats["charged"] == 6
    assert_outputs_right(out, sources, emulator)
