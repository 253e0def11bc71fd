"""Disk full or an unwritable --out: a clear error, and nothing marked done that is not on disk."""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch.emulator import Emulator
from batch.outputs import MIN_FREE
from batch.states import JobState
from tests.checks import assert_ledger_sound, assert_no_double_pay, assert_outputs_right
from tests.conftest import FAST_FLAGS, MakeEmulator, popen_cli, run_cli, wait_for
from tests.imagegen import write_portrait


def mount_small_disk(mount_point: Path, size: str) -> Iterator[Path]:
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root in a sandbox that allows it)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """Room for a run to start (see MIN_FREE), and a few MB more."""
    yield from mount_small_disk(tmp_path / "small-disk", f"{MIN_FREE + 8 * 2**20}")


def fill(disk: Path) -> Path:
    """What another program does to a shared disk: take every byte left."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def done_jobs_are_on_disk(ledger_path: Path, out: Path) -> int:
    from batch.ledger import open_ledger
    ledger = open_ledger(ledger_path)
    try:
        done = ledger.jobs_in([JobState.DONE])
        for job in done:
            for f in ledger.files_for_job(job.id):
                assert f.written_rel and (out / f.written_rel).is_file()
        return len(done)
    finally:
        ledger.close()


def test_disk_full_stops_cleanly_and_the_rerun_finishes(
        tmp_path: Path, small_disk: Path, make_emulator: MakeEmulator) -> None:
    """Another program takes the last byte of --out's disk mid-run: the downloads that meet
    it stop the run with the disk's own words, nothing is marked done that is not on disk,
    no partial file is left, and with room again the rerun saves what was paid for."""
    emulator = make_emulator(queue_seconds=0.5, process_seconds=1.0)
    src, ledger_path = tmp_path / "src", tmp_path / "ledger.sqlite"
    sources = {f"{i:02d}.png": write_portrait(src / f"{i:02d}.png", "PNG", seed=i,
                                              size=(200, 250), grain=8) for i in range(12)}
    args = ["run", str(src), "--out", str(small_disk), "--ledger", str(ledger_path),
            "--smart-skin", "--concurrency", "2", *FAST_FLAGS, "--max-qps", "6"]
    run = popen_cli(args, emulator)
    assert wait_for(lambda: emulator.stats.get("charged", 0) >= 3, timeout=60)
    filler = fill(small_disk)  # while the first results are still being made
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "No space left on device" in err
    assert "Traceback" not in err
    written = done_jobs_are_on_disk(ledger_path, small_disk)
    assert written < emulator.stats["charged"] < len(sources)
    assert not [p for p in small_disk.rglob("*") if ".skinbatch-" in p.name]

    filler.unlink()
    rerun = run_cli(args, emulator)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_outputs_right(small_disk, sources, emulator)
    assert emulator.stats["charged"] == len(sources)


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path: Path,
                                                      emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg")
    (out / ".skinbatch").mkdir(parents=True)
    (out / ".skinbatch").chmod(0o777)
    out.chmod(0o555)
    try:
        result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator,
                         as_plain_user=True)
    finally:
        out.chmod(0o755)
    assert result.returncode == 1
    assert "Cannot write to the output folder" in result.stderr
    assert "Permission denied" in result.stderr
    assert done_jobs_are_on_disk(out / ".skinbatch" / "ledger.sqlite", out) == 0
    rerun = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert rerun.returncode == 0
    assert emulator.stats["charged"] == 1
    assert_no_double_pay(out, emulator, 1)


def test_the_ledgers_disk_filling_mid_run_stops_the_run_cleanly(
        tmp_path: Path, small_disk: Path, make_emulator: MakeEmulator) -> None:
    """Another program takes the last byte of the ledger's disk mid-run: the run stops at
    once with one plain message (no traceback, nothing more sent), and once there is room
    the same command finishes the batch, every paid upload recorded."""
    emulator = make_emulator(queue_seconds=0.3, process_seconds=0.6)
    src, out, ledger = tmp_path / "src", tmp_path / "out", small_disk / "ledger.sqlite"
    sources = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(20)}
    report = small_disk / "report.html"
    args = ["run", str(src), "--out", str(out), "--ledger", str(ledger), "--smart-skin",
            "--report", str(report), *FAST_FLAGS, "--max-qps", "6"]
    run = popen_cli(args, emulator)
    assert wait_for(lambda: emulator.stats.get("charged", 0) >= 3, timeout=60)
    filler = fill(small_disk)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "The ledger cannot be written: the disk under it is full" in err, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    assert f"The report could not be written to {report}: No space left on device" in err
    assert [p.name for p in small_disk.iterdir() if "report" in p.name] == []
    charged = emulator.stats["charged"]
    assert charged < len(sources)  # it stopped mid-run
    time.sleep(1)
    assert emulator.stats["charged"] == charged  # and sends nothing once stopped

    filler.unlink()
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert report.is_file()
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, len(sources), str(ledger))
    assert_ledger_sound(out, str(ledger))


@pytest.fixture
def nearly_full_disk(tmp_path: Path) -> Iterator[Path]:
    """A disk with about 3 MB more than the room a run keeps free for what it has paid for."""
    yield from mount_small_disk(tmp_path / "disk", f"{MIN_FREE + 3 * 2**20}")


def test_uploads_stop_while_the_disk_still_has_room_for_what_was_paid(
        tmp_path: Path, nearly_full_disk: Path, make_emulator: MakeEmulator) -> None:
    """A night's results fill --out's disk (the ledger's too): uploads stop while there is
    still room, every result paid for is saved, the rest wait with the reason; a run on the
    full disk is refused before it sends anything; with room again, the batch finishes."""
    emulator = make_emulator(queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "src", nearly_full_disk / "retouched"
    sources = {f"{i:02d}.png": write_portrait(src / f"{i:02d}.png", "PNG", seed=i,
                                              size=(400, 500), grain=8) for i in range(20)}
    assert sum(map(len, sources.values())) > 6 * 2**20  # more than the disk takes
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS, "--max-qps", "10"]
    first = run_cli(args, emulator)
    assert first.returncode == 1, first.stderr
    assert f"No more uploads: the disk of {out.resolve()} has" in first.stderr, first.stderr
    assert "No space left" not in first.stderr and "Traceback" not in first.stderr
    charged = emulator.stats["charged"]
    assert 0 < charged < len(sources)
    assert len(list(out.glob("*.png"))) == charged  # every paid result is on disk
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert {p["reason"] for p in status["problems"]} == {"not sent: the disk is nearly full"}
    assert len(status["problems"]) == len(sources) - charged

    refused = run_cli(args, emulator)
    assert refused.returncode == 2 and "free some space first" in refused.stderr, refused
    assert emulator.stats["charged"] == charged

    subprocess.run(["mount", "-o", "remount,size=200m", str(nearly_full_disk)], check=True)
    final = run_cli(args, emulator)
    assert final.returncode == 0, final.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == len(sources)


def test_a_watch_stopped_by_a_full_disk_resumes_once_there_is_room(
        tmp_path: Path, nearly_full_disk: Path, make_emulator: MakeEmulator) -> None:
    """A watch runs for days: uploads that stopped for a nearly full disk start again, by
    themselves, once someone has made room."""
    emulator = make_emulator(queue_seconds=0.2, process_seconds=0.4)
    src, out = tmp_path / "incoming", nearly_full_disk / "retouched"
    src.mkdir()
    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.5", "--rescan", "3",
                      "--smart-skin", *FAST_FLAGS, "--max-qps", "10"], emulator)
    try:
        sources = {f"{i:02d}.png": write_portrait(src / f"{i:02d}.png", "PNG", seed=i,
                                                  size=(400, 500), grain=8) for i in range(20)}
        assert wait_for(lambda: shutil.disk_usage(nearly_full_disk).free < MIN_FREE, 60)
        time.sleep(2)
        stopped_at = emulator.stats["charged"]
        time.sleep(2)
        assert emulator.stats["charged"] == stopped_at < len(sources)  # waiting for room
        subprocess.run(["mount", "-o", "remount,size=300m", str(nearly_full_disk)], check=True)
        assert wait_for(lambda: all((out / name).exists() for name in sources), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "No more uploads: the disk of" in err and "uploads resume" in err, err
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == len(sources)


def test_the_dry_run_says_when_the_disk_would_stop_the_run(
        tmp_path: Path, nearly_full_disk: Path, emulator: Emulator) -> None:
    """Before a night: the dry run says that the results would not fit, and, on a disk that
    has no room left, that the run would be refused."""
    src, out = tmp_path / "src", nearly_full_disk / "retouched"
    for i in range(20):
        write_portrait(src / f"{i:02d}.png", "PNG", seed=i, size=(400, 500), grain=8)
    args = ["run", str(src), "--out", str(out), "--smart-skin", "--dry-run"]
    tight = run_cli(args, emulator)
    assert tight.returncode == 0, tight.stderr
    assert re.search(r"The results would take about \d+ MB on the disk of .*, which has \d+ MB "
                     r"free: uploads would stop when 64 MB are left", tight.stdout), tight.stdout
    filler = fill(nearly_full_disk)
    full = run_cli(args, emulator)
    assert f"The run would be refused: the disk of {out.resolve()} has" in full.stdout, \
        full.stdout
    filler.unlink()
    assert not out.exists()  # a dry run writes nothing
