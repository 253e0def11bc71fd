"""Disk full or an unwritable --out: a clear error, and nothing marked done that is not on disk."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch.emulator import Emulator
from batch.states import JobState
from tests.checks import assert_no_double_pay, assert_outputs_right
from tests.conftest import FAST_FLAGS, run_cli
from tests.imagegen import write_portrait


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs",
                              str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root in a sandbox that allows it)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


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
        tmp_path: Path, small_disk: Path, emulator: Emulator) -> None:
    src, ledger_path = tmp_path / "src", tmp_path / "ledger.sqlite"
    sources = {f"{i:02d}.png": write_portrait(src / f"{i:02d}.png", "PNG", seed=i,
                                              size=(200, 250), grain=8) for i in range(12)}
    args = ["run", str(src), "--out", str(small_disk), "--ledger", str(ledger_path),
            "--concurrency", "2", *FAST_FLAGS]
    full = run_cli(args, emulator)
    assert full.returncode == 1, full.stdout + full.stderr
    assert "No space left on device" in full.stderr
    assert "Traceback" not in full.stderr
    written = done_jobs_are_on_disk(ledger_path, small_disk)
    assert 0 < written < len(sources)
    assert not [p for p in small_disk.rglob("*") if ".skinbatch-" in p.name]

    subprocess.run(["umount", "-l", str(small_disk)], check=True)
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
