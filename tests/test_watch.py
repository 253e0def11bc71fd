"""Watch mode against real files arriving in a real folder."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from batch.emulator import Emulator, Faults
from tests.checks import assert_outputs_right, ledger_of
from tests.conftest import (
    API_KEY,
    FAST_FLAGS,
    MakeEmulator,
    cli_env,
    popen_cli,
    run_cli,
    stopped,
    wait_for,
)
from tests.imagegen import encode, portrait, write_portrait


@pytest.mark.parametrize("polling", [False, True])
def test_watch_takes_files_as_they_arrive(tmp_path: Path, emulator: Emulator,
                                          polling: bool) -> None:
    src, out = tmp_path / "incoming", tmp_path / "out"
    src.mkdir()
    args = ["watch", str(src), "--out", str(out), "--settle", "0.5", "--rescan", "3",
            *FAST_FLAGS, "--smart-skin"] + (["--polling"] if polling else [])
    proc = popen_cli(args, emulator)
    try:
        time.sleep(1.5)
        expected: dict[str, bytes] = {}
        # A slow writer: the file grows over ~2 s; it must not be taken half-written.
        slow = encode(portrait(300, 360, seed=1, grain=5), "JPEG")
        with open(src / "slow.jpg", "wb") as handle:
            for start in range(0, len(slow), len(slow) // 8 + 1):
                handle.write(slow[start : start + len(slow) // 8 + 1])
                handle.flush()
                time.sleep(0.25)
        expected["slow.jpg"] = slow
        # Written under a temporary name, then renamed into place.
        renamed = encode(portrait(seed=2), "JPEG")
        (src / "tethered.jpg.part").write_bytes(renamed)
        time.sleep(1.0)
        (src / "tethered.jpg.part").rename(src / "tethered.jpg")
        expected["tethered.jpg"] = renamed
        # A burst.
        burst = 200 if not polling else 40
        for i in range(burst):
            data = encode(portrait(64, 80, seed=100 + i), "JPEG")
            (src / "burst").mkdir(exist_ok=True)
            (src / "burst" / f"{i:03d}.jpg").write_bytes(data)
            expected[f"burst/{i:03d}.jpg"] = data
        assert wait_for(lambda: all((out / rel).exists() for rel in expected), timeout=120), \
            sorted(set(expected) - {str(p.relative_to(out)) for p in out.rglob("*.jpg")})[:5]
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert_outputs_right(out, expected, emulator)
    assert emulator.stats["charged"] == len(expected), "each file exactly once, none half-read"
    assert " 0 failed, 0 rejected" in stdout
    # Each file read once, but the slow one again if its writer stalled past the settle time
    # (a busy machine): it was not taken then, as it did not decode. The rescans read none.
    counted = re.search(r"\((\d+) files scanned, (\d+) read\)", stdout)
    assert counted is not None, stdout
    scanned, read = map(int, counted.groups())
    assert scanned == len(expected) and len(expected) <= read <= len(expected) + 2, stdout


def test_a_share_that_disappears_and_comes_back(tmp_path: Path, emulator: Emulator) -> None:
    share, away, out = tmp_path / "share", tmp_path / "share-offline", tmp_path / "out"
    share.mkdir()
    first = encode(portrait(seed=1), "JPEG")
    (share / "a.jpg").write_bytes(first)
    proc = popen_cli(["watch", str(share), "--out", str(out), "--settle", "0.3", "--rescan",
                      "0.5", "--polling", *FAST_FLAGS], emulator)
    try:
        assert wait_for(lambda: (out / "a.jpg").exists())
        share.rename(away)
        time.sleep(2)
        away.rename(share)
        second = encode(portrait(seed=2), "JPEG")
        (share / "b.jpg").write_bytes(second)
        assert wait_for(lambda: (out / "b.jpg").exists())
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert "is not reachable; waiting for it to come back" in stderr
    assert "is back" in stderr
    assert_outputs_right(out, {"a.jpg": first, "b.jpg": second}, emulator)


def test_a_watch_over_two_folders_starts_without_one_not_there_and_takes_it_when_it_comes(
        tmp_path: Path, emulator: Emulator) -> None:
    """A watch service over two hot folders, one on a drive not plugged in when it starts:
    it watches the other (it refused to start before, exit 2, and a service manager started
    it again and again) and takes the drive's photos once it is plugged in."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir()
    first = encode(portrait(seed=1), "JPEG")
    (a / "1.jpg").write_bytes(first)
    proc = popen_cli(["watch", str(a), str(b), "--out", str(out), "--settle", "0.3",
                      "--rescan", "0.5", *FAST_FLAGS], emulator)
    try:
        assert wait_for(lambda: (out / "a" / "1.jpg").exists())
        second = encode(portrait(seed=2), "JPEG")
        plugged = tmp_path / "plugged"
        plugged.mkdir()
        (plugged / "2.jpg").write_bytes(second)
        plugged.rename(b)
        assert wait_for(lambda: (out / "b" / "2.jpg").exists())
        third = encode(portrait(seed=3), "JPEG")
        (b / "3.jpg").write_bytes(third)
        assert wait_for(lambda: (out / "b" / "3.jpg").exists())
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"Source {b} is not reachable; waiting for it to come back." in stderr
    assert f"Source {b} is back." in stderr and "polling" not in stderr, stderr
    assert_outputs_right(out, {"a/1.jpg": first, "b/2.jpg": second, "b/3.jpg": third},
                         emulator)


def unshare_works() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                           capture_output=True, check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs user namespaces (unshare)")
@pytest.mark.parametrize(("knob", "limit", "later"), [
    ("max_inotify_instances", 0, False), ("max_inotify_watches", 1, False),
    ("max_inotify_watches", 2, True)])
def test_watch_falls_back_to_polling_when_inotify_runs_out(
        tmp_path: Path, emulator: Emulator, knob: str, limit: int, later: bool) -> None:
    """inotify unavailable (no instances left) or its watch limit hit (more folders than
    watches, at the start or as folders are added): the watcher says so and polls instead.
    The limits are set in a private user namespace, so the rest of the machine keeps its own."""
    src, out = tmp_path / "incoming", tmp_path / "out"
    src.mkdir()
    for folder in ("a", "b", "c"):
        if not later:
            (src / folder).mkdir()
    args = ["watch", str(src), "--out", str(out), "--settle", "0.3", "--rescan", "30",
            *FAST_FLAGS]
    shell = f'echo {limit} > /proc/sys/user/{knob} && exec "$0" "$@"'
    proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "sh", "-c", shell,
                             sys.executable, "-m", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env=cli_env(emulator, API_KEY, None))
    expected = {f"{folder}/{i}.jpg": encode(portrait(seed=i + ord(folder)), "JPEG")
                for folder in ("a", "c") for i in range(2)}
    try:
        time.sleep(2)
        for rel, data in expected.items():
            (src / rel).parent.mkdir(exist_ok=True)
            (src / rel).write_bytes(data)
        assert wait_for(lambda: all((out / rel).exists() for rel in expected), timeout=20), \
            "the polling observer must pick the files up well before the 30 s rescan"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert "Cannot watch with inotify" in stderr and "polling instead" in stderr, stderr[-2000:]
    assert_outputs_right(out, expected, emulator)


def done_jobs(out: Path) -> int:
    ledger = ledger_of(out)
    try:
        return ledger.counts()["done"]
    finally:
        ledger.close()


def test_a_watch_out_of_credits_carries_on_once_topped_up(tmp_path: Path,
                                                            make_emulator: MakeEmulator) -> None:
    """A hot folder that runs out of credits keeps taking files in, saves what was paid for,
    and sends the rest once someone tops the account up: nobody has to restart it."""
    emulator = make_emulator(credits=2.0)
    src, out = tmp_path / "incoming", tmp_path / "out"
    src.mkdir()
    photos = {f"{i}.jpg": encode(portrait(seed=i), "JPEG") for i in range(4)}
    for rel, data in list(photos.items())[:3]:
        (src / rel).write_bytes(data)
    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.3", "--rescan", "1",
                      *FAST_FLAGS, "--smart-skin"], emulator)
    try:
        assert wait_for(lambda: len(list(out.glob("*.jpg"))) == 2, timeout=30)
        (src / "3.jpg").write_bytes(photos["3.jpg"])  # arrives while the account is empty
        time.sleep(3)
        assert len(list(out.glob("*.jpg"))) == 2 and emulator.stats["charged"] == 2
        emulator.set_credits(10)
        # Saved, and recorded so: a result is renamed into place before its job is done.
        assert wait_for(lambda: done_jobs(out) == 4, timeout=30)
    finally:
        stdout, stderr = stopped(proc)
    assert_outputs_right(out, photos, emulator)
    assert emulator.stats["charged"] == 4 and "4 done, 0 failed" in stdout
    assert "out of credits" in stderr and "uploads resume" in stderr, stderr[-2000:]


def test_a_watch_whose_policy_is_all_or_nothing_waits_for_the_whole_batch(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """With on_short_balance = "stop" a top-up that pays for part of what waits sends
    nothing; one that pays for all of it sends it all."""
    emulator = make_emulator(credits=1.0)
    src, out = tmp_path / "incoming", tmp_path / "out"
    src.mkdir()
    photos = {f"{i}.jpg": encode(portrait(seed=i), "JPEG") for i in range(3)}
    for rel, data in photos.items():
        (src / rel).write_bytes(data)
    config = tmp_path / "c.toml"
    config.write_text('on_short_balance = "stop"\n')
    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.3", "--rescan", "1",
                      "--config", str(config), *FAST_FLAGS, "--smart-skin"], emulator)
    try:
        time.sleep(3)
        emulator.set_credits(2)
        time.sleep(3)
        assert emulator.stats.get("submits", 0) == 0, "2 credits do not pay for 3 photos"
        emulator.set_credits(3)
        assert wait_for(lambda: all((out / rel).exists() for rel in photos), timeout=30)
    finally:
        stopped(proc)
    assert emulator.stats["charged"] == 3


def test_a_watch_waits_out_a_result_host_that_is_down(tmp_path: Path,
                                                      make_emulator: MakeEmulator) -> None:
    """A hot folder runs for days: a result host down past the attempt limit does not end
    it. It keeps the paid results and tries them again, sends no new photo meanwhile (each
    would buy a result that cannot be fetched), and carries on once the host is back."""
    emulator = make_emulator(faults=Faults(download_5xx=1.0))
    src, out = tmp_path / "incoming", tmp_path / "out"
    src.mkdir()
    photos = {f"{i}.jpg": encode(portrait(seed=i), "JPEG") for i in range(3)}
    for rel in ("0.jpg", "1.jpg"):
        (src / rel).write_bytes(photos[rel])
    config = tmp_path / "c.toml"
    config.write_text("backoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 3\n")
    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.3", "--rescan", "1",
                      "--config", str(config), *FAST_FLAGS, "--smart-skin"], emulator)
    try:
        assert wait_for(lambda: emulator.stats.get("downloads", 0) >= 10, timeout=30)
        (src / "2.jpg").write_bytes(photos["2.jpg"])  # arrives while no result comes through
        time.sleep(3)
        assert proc.poll() is None, "the watch must not end"
        assert emulator.stats["submits"] == 2 and not list(out.glob("*.jpg"))
        emulator.config.faults.download_5xx = 0.0
        assert wait_for(lambda: all((out / rel).exists() for rel in photos), timeout=30)
    finally:
        _, stderr = stopped(proc)
    assert_outputs_right(out, photos, emulator)
    assert emulator.stats["charged"] == 3
    assert "No more uploads: results paid for cannot be fetched" in stderr
    assert "A result came through: uploads resume" in stderr


def test_a_watch_names_a_folder_it_cannot_read_once(tmp_path: Path,
                                                    emulator: Emulator) -> None:
    """A folder of the hot folder that the watch's user may not read (another user's copy):
    the watch says so once, not every pass, and takes the rest."""
    src, out = tmp_path / "incoming", tmp_path / "out"
    write_portrait(src / "a.jpg", seed=1)
    locked = src / "from another user"
    write_portrait(locked / "b.jpg", seed=2)
    locked.chmod(0)
    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.3", "--rescan", "0.5",
                      "--smart-skin", *FAST_FLAGS], emulator, as_plain_user=True)
    try:
        assert wait_for(lambda: (out / "a.jpg").exists(), timeout=60)
        write_portrait(src / "c.jpg", seed=3)  # a few passes later
        assert wait_for(lambda: (out / "c.jpg").exists(), timeout=60)
    finally:
        _, stderr = stopped(proc)
        locked.chmod(0o755)
    assert stderr.count(f"{locked}: cannot be read (Permission denied); its photos are left "
                        "out until it can be.") == 1, stderr


def test_retry_and_dismiss_work_beside_a_running_watch(tmp_path: Path,
                                                       emulator: Emulator) -> None:
    """A hot folder runs as a service for days: a person puts a failed photo back in line,
    or accepts one unretouched, without stopping it. The watch sends the photo put back at
    its next look and saves its result."""
    src, out = tmp_path / "incoming", tmp_path / "out"
    write_portrait(src / "a.jpg", seed=1)
    (src / "products").mkdir()
    for name, shade in (("bag.jpg", 40), ("shoe.jpg", 80)):
        Image.new("RGB", (320, 240), (shade, 120, 150)).save(src / "products" / name)

    def counts() -> dict[str, int]:
        status = run_cli(["status", "--out", str(out), "--json"], None)
        return dict(json.loads(status.stdout)["counts"]) if status.returncode == 0 else {}

    proc = popen_cli(["watch", str(src), "--out", str(out), "--settle", "0.2", "--rescan", "1",
                      "--smart-skin", *FAST_FLAGS], emulator)
    try:
        assert wait_for(lambda: counts().get("failed") == 2 and counts().get("done") == 1)
        emulator.config.require_face = False  # the bag is a photo the API takes after all
        retried = run_cli(["retry", "--out", str(out), "--failed", str(src / "products/bag.jpg")],
                          None)
        assert (retried.returncode, retried.stdout) == (
            0, "1 job(s) put back in line; run the same skinbatch run command again (a watch "
               "working on this ledger takes them by itself).\n"), retried
        dismissed = run_cli(["dismiss", "--out", str(out), str(src / "products/shoe.jpg")], None)
        assert dismissed.returncode == 0, dismissed
        assert wait_for(lambda: (out / "products" / "bag.jpg").exists())
    finally:
        stopped(proc)
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert status["problems"] == [] and status["dismissed"] == [str(src / "products/shoe.jpg")]
    assert emulator.stats["submits"] == 4


def test_a_watch_tries_once_more_the_uploads_it_gave_up_once_the_api_takes_uploads_again(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Behind a gateway that answers, the API's backend fails every upload for a while: a
    photo is failed at its attempt limit. A watch runs for weeks; once an upload goes
    through again, it tries the photo once more (as a run's start does) instead of leaving
    it failed until a restart."""
    emulator = make_emulator(faults=Faults(submit_5xx=1.0))
    src, out = tmp_path / "incoming", tmp_path / "out"
    sources = {"a.jpg": write_portrait(src / "a.jpg", seed=1)}
    config = tmp_path / "c.toml"
    config.write_text("max_attempts = 2\nbackoff_base = 0.01\nbackoff_cap = 0.02\n")
    proc = popen_cli(["watch", str(src), "--out", str(out), "--config", str(config),
                      "--settle", "0.2", "--rescan", "0.5", "--smart-skin", *FAST_FLAGS],
                     emulator)
    try:
        assert wait_for(lambda: json.loads(run_cli(
            ["status", "--out", str(out), "--json"], None).stdout or "{}").get(
            "counts", {}).get("failed") == 1)
        # Its reason says what the watch does with it, not what a next run would.
        assert "(tried once more when an upload goes through again, or by the next run)" in \
            run_cli(["status", "--out", str(out)], None).stdout
        emulator.config.faults.submit_5xx = 0.0
        sources["b.jpg"] = write_portrait(src / "b.jpg", seed=2)
        assert wait_for(lambda: all((out / name).exists() for name in sources))
    finally:
        _, stderr = stopped(proc)
    assert emulator.stats["charged"] == 2, stderr[-2000:]
    assert "Trying once more 1 photo(s) whose uploads the API failed" in stderr
    assert_outputs_right(out, sources, emulator)
