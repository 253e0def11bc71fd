"""Disk full or an unwritable --out: a clear error, and nothing marked done that is not on disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from batch.emulator import Emulator
from batch.outputs import MIN_FREE, remove_quietly
from batch.preflight import Rejected, check
from batch.states import JobState
from batch.status import collect_status
from tests.checks import (
    assert_ledger_sound,
    assert_no_double_pay,
    assert_outputs_right,
    ledger_of,
)
from tests.conftest import FAST_FLAGS, MakeEmulator, popen_cli, run_cli, stopped, wait_for
from tests.imagegen import write_portrait
from tests.netshare import mounted


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


def test_an_unwritable_output_folder_is_refused_before_anything_is_paid(
        tmp_path: Path, emulator: Emulator) -> None:
    """An --out this user may not write in (its state folder writable alone: made by an
    earlier run as another user) is refused at start, before the first upload."""
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
    assert result.returncode == 2, result.stderr
    assert f"cannot write to the output folder {out}: Permission denied" in result.stderr
    assert emulator.stats.get("charged", 0) == 0
    rerun = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert rerun.returncode == 0
    assert emulator.stats["charged"] == 1
    assert_no_double_pay(out, emulator, 1)


def test_photos_whose_output_folder_this_user_may_not_write_in_are_not_paid_for(
        tmp_path: Path, emulator: Emulator) -> None:
    """A folder under --out made by another user (a colleague over the share, a run with
    sudo), or a file where an output's folder would be: its photos are listed with the
    reason and not sent, the others are; once it can be written, the next run sends them.
    (Paid, their results stopped the night at their download.)"""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{folder}/{i}.jpg": write_portrait(src / folder / f"{i}.jpg", seed=seed + i)
               for folder, seed in (("a", 0), ("b", 10), ("c", 20)) for i in range(3)}
    (out / "b").mkdir(parents=True)
    (out / "b").chmod(0o555)
    (out / "c").write_bytes(b"a file of the studio's")
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    try:
        result = run_cli(args, emulator, as_plain_user=True)
    finally:
        (out / "b").chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "Cannot write to" not in result.stderr, result.stderr
    for i in range(3):
        assert (f"{src / 'b' / f'{i}.jpg'}: its output folder {out / 'b'} cannot be written by "
                "this user") in result.stdout, result.stdout
        assert (f"{src / 'c' / f'{i}.jpg'}: {out / 'c'} is a file where its output's folder "
                "would be") in result.stdout, result.stdout
    assert emulator.stats["charged"] == 3
    assert sorted(p.name for p in (out / "a").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    (out / "c").unlink()
    again = run_cli(args, emulator, as_plain_user=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert emulator.stats["charged"] == 9
    assert_outputs_right(out, sources, emulator)


def deep(length: int, name: str) -> str:
    """A relative path of exactly ``length`` bytes (folders of up to 200) ending in ``name``."""
    rest, folders = length - len(name), []
    while rest > 402:
        folders.append("d" * 200)
        rest -= 201
    if rest > 256:
        folders.append("e" * (rest // 2 - 1))
        rest -= rest // 2
    if rest:
        assert rest >= 2, rest
        folders.append("f" * (rest - 1))
    rel = "/".join([*folders, name])
    assert len(rel.encode()) == length
    return rel


def test_an_output_path_longer_than_the_system_takes_is_refused_before_it_is_paid(
        tmp_path: Path, emulator: Emulator) -> None:
    """A deep tree whose sources fit in a path (4096 bytes with the final NUL), but not the
    temp file each output is written through under a longer --out: refused at the scan,
    with the reason, not paid. (Paid, it stopped the night at its download.)"""
    src, out = tmp_path / "s", tmp_path / "out"
    rel = deep(4095 - len(bytes(out)) - 1, "long.jpg")  # out/rel fits; its temp file not
    write_portrait(src / rel, seed=1)
    short = write_portrait(src / "short.jpg", seed=2)
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                     emulator)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"saving its output takes a path of \d+ bytes \(the output's, or the "
                     r"temp file's it is written through\), more than a path may be \(4095\)",
                     result.stdout), result.stdout
    assert emulator.stats["charged"] == 1
    assert_outputs_right(out, {"short.jpg": short}, emulator)


def test_one_output_name_the_disk_refuses_does_not_stop_the_night(
        tmp_path: Path, emulator: Emulator) -> None:
    """A paid result whose name the disk turns down when it is saved (here: the numbered
    name of on_collision = "suffix" one byte past the longest path) is listed with the
    reason, where it stopped the whole run with 'Cannot write to ...'."""
    src, out = tmp_path / "s", tmp_path / "out"
    name = "t" * 246 + ".jpg"  # its temp file's name is shorter: it takes 80 bytes of it
    rel = deep(4095 - len(bytes(out)) - 1, name)  # out/rel: the longest path there is
    write_portrait(src / rel, seed=1)
    short = write_portrait(src / "short.jpg", seed=2)
    (out / rel).parent.mkdir(parents=True)
    (out / rel).write_bytes(b"a file of the studio's, kept")
    config = tmp_path / "c.toml"
    config.write_text('on_collision = "suffix"\n')
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config),
                      "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Cannot write to" not in result.stderr, result.stderr
    assert "the disk of --out does not take this name (File name too long)" in result.stdout
    assert (out / rel).read_bytes() == b"a file of the studio's, kept"
    assert_outputs_right(out, {"short.jpg": short}, emulator)


@pytest.fixture
def exfat_card(tmp_path: Path) -> Iterator[Path]:
    """A real exFAT filesystem (a camera card, a USB drive a studio delivers on), through
    the FUSE driver, on a loop device."""
    if not all(shutil.which(tool) for tool in ("mkfs.exfat", "mount.exfat-fuse", "losetup")):
        pytest.skip("needs exfatprogs and exfat-fuse (apt-get install exfatprogs exfat-fuse)")
    image = tmp_path / "card.img"
    with image.open("wb") as handle:
        handle.truncate(MIN_FREE + 64 * 2**20)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                          text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device here: {loop.stderr.strip()}")
    device, card = loop.stdout.strip(), tmp_path / "card"
    card.mkdir()
    try:
        mounted = subprocess.run(["mount.exfat-fuse", device, str(card)], capture_output=True,
                                 text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount exFAT here: {mounted.stderr.strip()}")
        yield card
        subprocess.run(["umount", str(card)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_names_an_exfat_drive_refuses_are_rejected_before_they_are_paid(
        tmp_path: Path, emulator: Emulator, exfat_card: Path) -> None:
    """Delivering on an exFAT drive: a photo named with a colon (a time in a tethering
    tool's name), or in a folder named so, cannot be saved there. Each is refused with the
    reason before it is sent; the others are saved. (Paid, it stopped the night at its
    download, and every night after.)"""
    src, out = tmp_path / "src", exfat_card / "delivery"
    write_portrait(src / "portrait 12:30.jpg", seed=1)
    write_portrait(src / "Smith | Jones" / "a.jpg", seed=2)
    fine = write_portrait(src / "fine.jpg", seed=3)
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                     emulator)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("the disk of --out does not take this name") == 2, result.stdout
    assert emulator.stats["charged"] == 1
    assert_outputs_right(out, {"fine.jpg": fine}, emulator)


@pytest.mark.parametrize("on_collision", ["skip", "overwrite"])
def test_photos_an_exfat_drive_takes_for_one_name_are_paid_for_once(
        tmp_path: Path, emulator: Emulator, exfat_card: Path, on_collision: str) -> None:
    """exFAT (like macOS's disks and Windows shares) does not tell upper from lower case:
    IMG_1.JPG beside img_1.jpg, or a.jpg in Session/ and A.jpg in session/, would give one
    output file, and the second paid result was refused (or, under "overwrite", replaced
    the first's). The first of each name is sent; the other is rejected with the reason
    before it is paid, and stays so on the next run."""
    src, out = tmp_path / "src", exfat_card / "delivery"
    sources = {rel: write_portrait(src / rel, seed=i) for i, rel in enumerate(
        ["IMG_1.JPG", "img_1.jpg", "Session/a.jpg", "session/A.jpg", "session/b.jpg"])}
    config = tmp_path / "skinbatch.toml"
    config.write_text(f'on_collision = "{on_collision}"\n')
    args = ["run", str(src), "--out", str(out), "--config", str(config), "--smart-skin",
            *FAST_FLAGS]
    result = run_cli(args, emulator)
    assert result.returncode == 1, result.stdout + result.stderr
    refused = re.findall(r"rejected +\S+/src/(\S+): its output \S+ is the same file as the "
                         r"result of (\S+) on the disk of --out, which does not tell upper "
                         r"from lower case", result.stdout)
    assert len(refused) == 2, result.stdout
    assert {frozenset(pair) for pair in refused} == {frozenset({"IMG_1.JPG", "img_1.jpg"}),
                                                     frozenset({"Session/a.jpg",
                                                                "session/A.jpg"})}
    assert emulator.stats["charged"] == 3
    assert_outputs_right(out, {rel: data for rel, data in sources.items()
                               if rel not in {r for r, _ in refused}}, emulator)
    again = run_cli(args, emulator)
    assert again.returncode == 1 and emulator.stats["charged"] == 3


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
    assert err.count("The ledger cannot be written") == 1, err
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


class Drive:
    """A drive at a mount point, unplugged the way a USB drive or a dropped share is: its
    open files fail at once (a FUSE mount whose daemon dies) and its mount point is left
    behind, an empty folder of another disk."""

    def __init__(self, disk: Path, mount_point: Path) -> None:
        self.disk, self.mount_point = disk, mount_point
        self.disk.mkdir()
        self.mount_point.mkdir(exist_ok=True)
        self._daemon: subprocess.Popen[bytes] | None = None

    def plug(self) -> None:
        if shutil.which("bindfs") is None:
            pytest.skip("needs bindfs (apt-get install bindfs)")
        subprocess.run(["umount", "-l", str(self.mount_point)], check=False,
                       capture_output=True)  # after die(): the dead mount goes first
        self._daemon = subprocess.Popen(["bindfs", "-f", str(self.disk), str(self.mount_point)],
                                        stderr=subprocess.DEVNULL)
        if not wait_for(lambda: os.path.ismount(self.mount_point), timeout=10):
            self.unplug()
            pytest.skip("cannot mount a FUSE filesystem here")

    def die(self) -> None:
        """A share whose server went down: still mounted, every access fails (ENOTCONN)."""
        if self._daemon is not None:
            self._daemon.kill()
            self._daemon.wait()
            self._daemon = None

    def unplug(self) -> None:
        self.die()
        subprocess.run(["umount", "-l", str(self.mount_point)], check=False,
                       capture_output=True)


@pytest.fixture
def drive(tmp_path: Path) -> Iterator[Drive]:
    drive = Drive(tmp_path / "drive", tmp_path / "usb")
    drive.plug()
    yield drive
    drive.unplug()


def test_an_output_drive_unplugged_mid_run_keeps_the_results_for_when_it_is_back(
        tmp_path: Path, emulator: Emulator, drive: Drive) -> None:
    """The output drive, which holds the ledger too, goes away during a run: the run stops
    with what happened and what to do, creates nothing on the empty mount point (results
    written there would be hidden once the drive is back, their jobs done), and keeps what
    was paid for: the next run, with the drive back, saves it without paying again."""
    src, out = tmp_path / "src", drive.mount_point / "retouched"
    sources = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(20)}
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS, "--max-qps", "4"]
    proc = popen_cli(args, emulator)
    try:
        assert wait_for(lambda: len(list(out.glob("*.jpg"))) >= 2, timeout=60)
    finally:
        drive.unplug()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert re.search(r"skinbatch: The ledger \S+ledger.sqlite is gone \(its drive unplugged or "
                     r"its share unmounted\?\)\. What was paid for is recorded in it: run the "
                     r"same command once it is back\.", stderr), stderr
    assert "Traceback" not in stderr and "unexpected error" not in stderr
    assert list(drive.mount_point.iterdir()) == []  # nothing made on the disk beneath
    assert len(list((drive.disk / "retouched").glob("*.jpg"))) < emulator.stats["charged"] < 20

    drive.plug()
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, 20)


def test_an_upload_answered_after_the_ledger_went_is_recorded_by_the_next_run(
        tmp_path: Path, make_emulator: MakeEmulator, drive: Drive) -> None:
    """The output drive, and the ledger on it, goes away between an upload's charge and its
    answer: the run ends, keeping the answer on this machine's own disk, and the next run,
    the drive back, records it and saves its result instead of taking it for a lost answer
    and paying again."""
    emulator = make_emulator(answer_seconds=3.0)  # the answer comes after the unplug
    src, out = tmp_path / "src", drive.mount_point / "retouched"
    sources = {"a.jpg": write_portrait(src / "a.jpg")}
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    proc = popen_cli(args, emulator)
    try:
        assert wait_for(lambda: emulator.stats.get("charged") == 1, timeout=30)
    finally:
        drive.unplug()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "1 upload(s) were answered once the ledger had gone: kept on this machine for " \
           "the next run on it to record" in stderr, stderr
    emulator.config.answer_seconds = 0.0
    drive.plug()
    status = run_cli(["status", "--out", str(out)], None)
    assert "1 upload(s) answered once the ledger had gone are kept on this machine: the next " \
           "run records them, not paying again" in status.stdout, status.stdout
    ledger = ledger_of(out)  # the library's status says so too
    try:
        assert collect_status(ledger).answers_kept == 1
    finally:
        ledger.close()
    dry = run_cli([*args, "--dry-run"], emulator)
    assert "would send:   0 image(s)" in dry.stdout, dry.stdout
    assert "1 upload(s) answered while the ledger was away would be recorded, not paid for " \
           "again." in dry.stdout
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert "Recorded 1 upload(s) answered while the ledger was away." in again.stderr
    assert emulator.stats["charged"] == 1 and emulator.stats["submits"] == 1
    assert "kept on this machine" not in run_cli(["status", "--out", str(out)], None).stdout
    assert_outputs_right(out, sources, emulator)


@pytest.mark.parametrize("ledger_on_the_drive", [False, True],
                         ids=["ledger-elsewhere", "ledger-on-the-drive"])
def test_a_watch_waits_for_its_output_drive_to_come_back(
        tmp_path: Path, make_emulator: MakeEmulator, drive: Drive,
        ledger_on_the_drive: bool) -> None:
    """A hot folder runs for days: its output drive going away for a while (a share
    remounted, a drive plugged in again) does not end it, whether or not its ledger lives
    there too. It sends nothing new meanwhile (a result could not be saved), keeps the result
    paid for before, creates nothing on the empty mount point, and saves them all once the
    drive is back, leaving none of its temp files there. An upload charged before the unplug
    and answered after it is not paid for again: its task, kept while the ledger was away,
    is recorded once it is back."""
    emulator = make_emulator(process_seconds=2.0)  # a result still being made at the unplug
    src, out = tmp_path / "incoming", drive.mount_point / "retouched"
    src.mkdir()
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(2)}
    ledger = [] if ledger_on_the_drive else ["--ledger", str(tmp_path / "ledger.sqlite")]
    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.3", "--rescan", "1",
                      "--smart-skin", *ledger, *FAST_FLAGS], emulator)
    try:
        assert wait_for(lambda: all((out / name).exists() for name in sources), timeout=60)
        emulator.config.answer_seconds = 3.0  # the upload's answer comes after the unplug
        sources["2.jpg"] = write_portrait(src / "2.jpg", seed=2)
        assert wait_for(lambda: emulator.stats["charged"] == 3, timeout=30)  # paid, not saved
        drive.unplug()
        emulator.config.answer_seconds = 0.0
        sources["3.jpg"] = write_portrait(src / "3.jpg", seed=3)  # not sent meanwhile
        time.sleep(4)
        assert proc.poll() is None, "the watch must not end"
        assert emulator.stats["charged"] == 3
        assert list(drive.mount_point.iterdir()) == []
        drive.plug()
        assert wait_for(lambda: all((out / name).exists() for name in sources), timeout=60)
    finally:
        _, stderr = stopped(proc)
    if ledger_on_the_drive:
        assert "ledger.sqlite is gone (its drive unplugged or its share unmounted?). What was " \
               "paid for is recorded in it: the watch waits for it to come back." in stderr
        assert "ledger.sqlite is back: watching again." in stderr
        assert "Recorded 1 upload(s) answered while the ledger was away." in stderr
    else:
        assert "No more uploads: the output folder is gone" in stderr
        assert "The output folder is back: uploads resume" in stderr
    assert "Traceback" not in stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 4, stderr


def signed_portrait(path: Path, seed: int) -> bytes:
    """A portrait whose EXIF names its photographer: the result must carry it."""
    exif = Image.Exif()
    exif[0x013B], exif[0x8298] = "Ana Photographer", "(c) 2026 Studio 42"
    return write_portrait(path, seed=seed, exif=exif.tobytes())


def signed(path: Path) -> bool:
    with Image.open(path) as image:
        return image.getexif().get(0x8298) == "(c) 2026 Studio 42"


def test_results_wait_for_their_source_drive_to_be_saved_with_its_metadata(
        tmp_path: Path, make_emulator: MakeEmulator, drive: Drive) -> None:
    """The drive the photos are on (a card reader, an external disk) goes away while their
    results are being made: saved then, the results would lack the photos' metadata (its
    copyright, capture time, colour profile) for good, and the photos not sent yet were
    rejected one by one as "disappeared". The run stops with the results kept and the rest
    waiting, and the same command saves them all, signed, once the drive is back, with
    nothing paid twice."""
    emulator = make_emulator(process_seconds=1.0)
    src, out = drive.mount_point / "shoot", tmp_path / "out"
    sources = [f"{i:02d}.jpg" for i in range(16)]
    for i, name in enumerate(sources):
        signed_portrait(src / name, seed=i)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS, "--max-qps", "4"]
    proc = popen_cli(args, emulator)
    try:
        assert wait_for(lambda: 1 <= len(list(out.glob("*.jpg")))
                        <= emulator.stats.get("charged", 0) - 2, timeout=60)
    finally:
        drive.unplug()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert f"The source folder {src} is gone (a drive unplugged, a share unmounted?): the " \
           "results paid for are kept, and the same command saves them, with their photos' " \
           "metadata, once it is back." in stderr
    assert "disappeared" not in stderr and "need attention" not in stderr, stderr
    status = run_cli(["status", "--out", str(out)], None)
    assert "rejected" not in status.stdout, status.stdout
    saved = list(out.glob("*.jpg"))
    assert len(saved) < emulator.stats["charged"]
    assert all(signed(path) for path in saved)

    drive.plug()
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert all(signed(out / name) for name in sources)  # each there, signed
    assert_no_double_pay(out, emulator, 16)


def test_a_watch_whose_source_share_goes_down_waits_for_it(
        tmp_path: Path, make_emulator: MakeEmulator, drive: Drive) -> None:
    """The hot folder is on a share whose server goes down while a photo of it is being
    retouched: still mounted, every look at it fails. The watch says so and waits (it ended
    on the error before), keeps the result until the share is back, then saves it with the
    photo's metadata, takes new photos again, and pays once for each."""
    emulator = make_emulator(process_seconds=1.5)
    src, out = drive.mount_point / "incoming", tmp_path / "out"
    src.mkdir()
    signed_portrait(src / "0.jpg", seed=0)
    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.3", "--rescan", "1",
                      "--smart-skin", *FAST_FLAGS], emulator)
    try:
        assert wait_for(lambda: (out / "0.jpg").exists(), timeout=60)
        signed_portrait(src / "1.jpg", seed=1)
        assert wait_for(lambda: emulator.stats["charged"] == 2, timeout=30)
        drive.die()  # while 1.jpg is being retouched
        time.sleep(4)  # a few passes
        assert proc.poll() is None, "the watch must not end"
        assert not (out / "1.jpg").exists()
        drive.plug()
        assert wait_for(lambda: (out / "1.jpg").exists(), timeout=60)
        signed_portrait(src / "2.jpg", seed=2)
        assert wait_for(lambda: (out / "2.jpg").exists(), timeout=60)
    finally:
        _, stderr = stopped(proc)
    assert f"Source {src} is not reachable; waiting for it to come back." in stderr
    assert f"Results of the photos in {src} wait for it to come back" in stderr
    assert f"Source {src} is back." in stderr
    assert all(signed(out / f"{i}.jpg") for i in range(3))
    assert emulator.stats["charged"] == 3


def test_a_partial_download_on_a_drive_that_died_is_left_for_later_not_raised(
        drive: Drive) -> None:
    """A download under way (or just placed) when its drive dies: removing its temp file
    fails with the drive's own error. That must not stop the run (a watch ended on it); it is
    said not gone, and removed once the drive is back (by a watch then, else by the next
    run's clean-up)."""
    partial = drive.mount_point / ".IMG_1.jpg.skinbatch-test.part"
    partial.write_bytes(b"half a result")
    drive.die()
    with pytest.raises(OSError):
        partial.unlink()  # the drive's own error, as the download's clean-up meets it
    assert remove_quietly(partial) is False
    drive.plug()
    assert partial.exists()
    assert remove_quietly(partial) is True and not partial.exists()


def test_a_photo_whose_share_dies_while_it_is_checked_is_not_taken_for_a_damaged_file(
        drive: Drive) -> None:
    """The scan checks a photo from the open file where it does not hold it whole (a TIFF
    master, a ledger that keys whole files): a share dying under that read is the disk's
    error, which the scan lists as "cannot read" and reads again next time, never a verdict
    that the photo is damaged (a rejection, kept until the file changes)."""
    photo = drive.mount_point / "IMG_1.jpg"
    size = len(write_portrait(photo, size=(1200, 1500), grain=24))
    with photo.open("rb", buffering=0) as handle:
        assert check(handle, size=size).format == "JPEG"
        handle.seek(0)
        drive.die()
        # The header is still in memory; the pixels are read from the share.
        os.posix_fadvise(handle.fileno(), 4096, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as raised:
            check(handle, size=size)
    assert raised.value.errno is not None and not isinstance(raised.value, Rejected)


def test_a_share_whose_server_is_down_at_start_is_one_clear_sentence(
        tmp_path: Path, emulator: Emulator, drive: Drive) -> None:
    """The night's --out (or ledger) is on a share whose server is down: still mounted,
    every look fails. Each command says which folder cannot be reached and why, exit 2,
    nothing sent (a Python traceback before)."""
    src = tmp_path / "src"
    write_portrait(src / "a.jpg")
    drive.die()
    share = drive.mount_point
    for args, what in (
            (["run", str(src), "--out", str(share / "out"), "--smart-skin"], f"--out {share}"),
            (["watch", str(src), "--out", str(share / "out"), "--smart-skin"], f"--out {share}"),
            (["run", str(src), "--out", str(tmp_path / "out"), "--ledger",
              str(share / "ledgers" / "studio.sqlite"), "--smart-skin"], f"the folder {share}"),
            (["status", "--out", str(share / "out")], f"the ledger {share}")):
        result = run_cli(args, emulator, timeout=60)
        assert result.returncode == 2, result.stderr
        assert re.search(f"skinbatch: {re.escape(what)}\\S* cannot be reached: Transport "
                         "endpoint is not connected \\(is its drive or share there, and its "
                         "server up\\?\\)", result.stderr), result.stderr
        assert "Traceback" not in result.stderr
    assert emulator.stats.get("submits", 0) == 0


@pytest.fixture
def drive_in_mnt(tmp_path: Path) -> Iterator[Drive]:
    """A drive mounted in /mnt by hand or by a script (not by the mount table), as on many
    studio machines."""
    slot = Path("/mnt") / f"skinbatch-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        slot.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a folder in /mnt here: {exc.strerror}")
    try:
        drive = Drive(tmp_path / "drive", slot)
        drive.plug()
        yield drive
        drive.unplug()
    finally:
        shutil.rmtree(slot, ignore_errors=True)


def test_a_drive_mounted_by_hand_and_not_mounted_tonight_is_not_paid_for_again(
        tmp_path: Path, emulator: Emulator, drive_in_mnt: Drive) -> None:
    """The results drive is mounted in /mnt by a script, not by the mount table; one night
    it is not there and its mount point is an empty folder of the system disk. A run would
    start a new ledger there and pay again for every photo in the source: it is refused
    before anything is made, with --out the mount point itself too. With the drive back,
    nothing is paid again; a folder made there on purpose is taken."""
    src, slot = tmp_path / "src", drive_in_mnt.mount_point
    for i in range(3):
        write_portrait(src / f"{i}.jpg", seed=i)
    args = ["run", str(src), "--out", str(slot / "retouched"), "--smart-skin", *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 0
    drive_in_mnt.unplug()
    for out in (slot / "retouched", slot):
        refused = run_cli([*args[:3], str(out), *args[4:]], emulator)
        assert refused.returncode == 2, refused.stderr
        assert f"is on {slot}, an empty folder in /mnt, where drives and shares are mounted, " \
               "and nothing is mounted there now: mount it first" in refused.stderr
    assert list(slot.iterdir()) == [] and emulator.stats["charged"] == 3
    drive_in_mnt.plug()
    again = run_cli(args, emulator)
    assert again.returncode == 0 and emulator.stats["charged"] == 3, again.stderr
    drive_in_mnt.unplug()
    (slot / "results").mkdir()  # meant to be on the system disk
    meant = run_cli([*args[:3], str(slot / "results" / "retouched"), *args[4:]], emulator)
    assert meant.returncode == 0, meant.stderr


def mount_ext4(image: Path, mount_point: Path) -> str:
    """Mount an ext4 image as a drive the system makes read-only on its first error (as
    Debian mounts its disks); returns its device's name."""
    mount_point.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image),
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount an ext4 image here: {mounted.stderr.strip()}")
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount_point)],
                            capture_output=True, text=True, check=True)
    return Path(source.stdout.strip()).name


@pytest.fixture
def failing_drive(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An ext4 drive on a loop device, and its image (to mount it again once it failed)."""
    if not shutil.which("mkfs.ext4"):
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    image, drive = tmp_path / "drive.img", tmp_path / "drive"
    with image.open("wb") as handle:
        handle.truncate(MIN_FREE + 96 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True, capture_output=True)
    device = mount_ext4(image, drive)
    if not Path(f"/sys/fs/ext4/{device}/trigger_fs_error").exists():
        subprocess.run(["umount", str(drive)], check=False)
        pytest.skip("this kernel cannot be asked to fail an ext4 drive")
    yield drive, image
    subprocess.run(["umount", str(drive)], check=False)


def test_a_drive_the_system_makes_read_only_mid_run_stops_it_with_the_cause(
        tmp_path: Path, failing_drive: tuple[Path, Path], make_emulator: MakeEmulator) -> None:
    """The drive holding --out (and its ledger) reports an error mid-run and the system makes
    it read-only: the run stops with what happened and nothing more is sent; status still
    reads the ledger, the report says where it cannot be written; once the drive is checked
    and mounted again, the same command saves every result, none paid twice."""
    drive, image = failing_drive
    emulator = make_emulator(queue_seconds=0.5, process_seconds=1.0)
    src, out = tmp_path / "src", drive / "out"
    sources = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(20)}
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS, "--max-qps", "6"]
    run = popen_cli(args, emulator)
    assert wait_for(lambda: emulator.stats.get("charged", 0) >= 3, timeout=60)
    device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(drive)], capture_output=True,
                            text=True, check=True).stdout.strip()
    Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("test\n")
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "The ledger cannot be written: the disk under it failed the write" in err, err
    assert err.count("The ledger cannot be written") == 1, err  # the cron mail says it once
    assert "Traceback" not in err, err
    charged = emulator.stats["charged"]
    assert charged < len(sources)
    time.sleep(1)
    assert emulator.stats["charged"] == charged

    status = run_cli(["status", "--out", str(out)], emulator)
    assert status.returncode != 2 and "jobs by state" in status.stdout, status.stderr
    report = run_cli(["report", "--out", str(out)], emulator)
    assert report.returncode == 2 and "Traceback" not in report.stderr
    assert "cannot write the report to" in report.stderr, report.stderr
    assert run_cli(["report", "--out", str(out), "-o", str(tmp_path / "r.html")],
                   emulator).returncode == 0

    subprocess.run(["umount", str(drive)], check=True)
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)
    mount_ext4(image, drive)
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, len(sources))
    assert_ledger_sound(out)


@pytest.fixture
def network_share(tmp_path: Path) -> Iterator[Path]:
    with mounted(tmp_path / "nas") as share:
        yield share


def test_a_ledger_on_a_network_share_is_said_once_to_each_machine(
        tmp_path: Path, emulator: Emulator, network_share: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """--out on a NAS share with the ledger under it, as most studios have it: the runs work
    there, and the first run from a machine says that one machine at a time may run on such
    a ledger. Not every night after (a cron job mails what it prints), nor by status; a
    second machine is told at its first run."""
    src, out = tmp_path / "src", network_share / "retouched"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(3)}
    args = ["run", str(src), "--out", str(out), "--smart-skin", "-q", *FAST_FLAGS]
    first = run_cli(args, emulator)
    assert first.returncode == 0, first.stderr
    assert "ledger.sqlite is on a network share (fuse.sshfs): run skinbatch on it from one " \
           "machine at a time" in first.stderr, first.stderr
    sources["3.jpg"] = write_portrait(src / "3.jpg", seed=3)  # the next night's photo
    again = run_cli(args, emulator)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    status = run_cli(["status", "--out", str(out)], None)
    assert status.returncode == 0 and status.stderr == "", status.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 4

    from batch.locking import tell_if_on_a_share
    monkeypatch.setattr("socket.gethostname", lambda: "studio-b")
    ledger = ledger_of(out)
    try:
        with caplog.at_level(logging.INFO, logger="batch.locking"):
            tell_if_on_a_share(ledger)
            tell_if_on_a_share(ledger)
    finally:
        ledger.close()
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
