"""Nightly runs: money under control, deadlines that protect paid work, the morning report."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from batch.emulator import Emulator
from batch.preflight import identity_digest
from batch.stages.runtime import UNPROVEN_UPLOADS
from tests.checks import assert_no_double_pay, assert_outputs_right, ledger_of
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

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def shoot(src: Path, n: int) -> dict[str, bytes]:
    return {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(n)}


def test_max_credits_caps_uploads_and_the_rest_wait_with_a_reason(tmp_path: Path,
                                                                  emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 8)
    capped = run_cli(["run", str(src), "--out", str(out), "--max-credits", "3", *FAST_FLAGS],
                     emulator)
    assert capped.returncode == 1
    assert emulator.stats["charged"] == 3 and len(list(out.glob("*.jpg"))) == 3
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    waiting = [p for p in status["problems"] if p["state"] == "pending"]
    assert len(waiting) == 5 and all(p["reason"] == "not sent: budget reached" for p in waiting)
    # The run's own summary says it once, with how many, not once a photo.
    said = [line for line in capped.stdout.splitlines() if "not sent" in line]
    assert said == ["  pending   5 photo(s) not sent: budget reached"], capped.stdout
    # The next night, without the cap, is stopped after its first upload (a reboot): a
    # waiting photo's reason belongs to the run that wrote it, and this run had no budget.
    slow = popen_cli(["run", str(src), "--out", str(out), "--poll-interval", "0.05",
                      "--max-qps", "0.5", "--no-progress"], emulator)
    assert wait_for(lambda: emulator.stats["submits"] >= 4), "the fourth upload never came"
    stopped(slow)
    assert emulator.stats["submits"] < 8
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert not [p for p in status["problems"] if "budget" in p["reason"]], status["problems"]
    final = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert final.returncode == 0
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 8


def test_a_short_balance_with_the_stop_policy_sends_nothing(tmp_path: Path,
                                                            make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(credits=2)
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 5)
    config = tmp_path / "c.toml"
    config.write_text('on_short_balance = "stop"\n')
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS],
                     emulator)
    assert result.returncode == 3
    assert "balance is too low" in result.stderr
    assert emulator.stats.get("submits", 0) == 0


def test_a_balance_query_refused_at_the_start_is_asked_again_before_anything_is_sent(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """The balance decides what a night may spend: a 429 (a key another client is using) or
    a gateway's 5xx on that first query is retried as any request is, so that the stop
    policy still refuses a batch the balance cannot pay for, and a balance the API will not
    give at all is not taken for "enough": under that policy nothing is sent. The dry run
    reads it the same way."""
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 5)
    config = tmp_path / "c.toml"
    config.write_text('on_short_balance = "stop"\n')
    args = ["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS]
    busy = make_emulator(credits=2, faults={"credits_refused": 2})
    result = run_cli(args, busy)
    assert result.returncode == 3, result.stderr
    assert "balance is too low" in result.stderr and "Could not read" not in result.stderr
    assert busy.stats["credit_queries"] == 3 and busy.stats.get("submits", 0) == 0
    dry = run_cli([*args, "--dry-run"], make_emulator(credits=2, faults={"credits_refused": 1}))
    assert "balance: 2 credit(s): NOT enough" in dry.stdout, dry.stdout + dry.stderr

    refusing = make_emulator(credits=100, faults={"credits_refused": 100})
    result = run_cli(args, refusing)
    assert result.returncode == 3, result.stderr
    assert re.search(r"the balance could not be read \(.*HTTP 429.*\), and on_short_balance = "
                     r'"stop" sends a batch only once the balance is known to pay for it',
                     result.stderr), result.stderr
    assert refusing.stats["credit_queries"] == 4 and refusing.stats.get("submits", 0) == 0


def ledger_digest(out: Path) -> str:
    return hashlib.sha256((out / ".skinbatch" / "ledger.sqlite").read_bytes()).hexdigest()


def test_dry_run_reports_and_changes_nothing(tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 3)
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    for i in range(3, 6):
        write_portrait(src / f"{i:02d}.jpg", seed=i)
    (src / "notes.jpg").write_text("not a photo")
    before, stats, listing = ledger_digest(out), emulator.stats, sorted(out.rglob("*"))
    result = run_cli(["run", str(src), "--out", str(out), "--dry-run", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert "would send:   3 image(s), about 3 credit(s)" in result.stdout
    assert "would reject: 1" in result.stdout and "notes.jpg: not an image" in result.stdout
    assert "already done: 3" in result.stdout
    assert "balance: 997 credit(s): enough" in result.stdout
    assert emulator.stats["submits"] == stats["submits"]
    assert ledger_digest(out) == before and sorted(out.rglob("*")) == listing


def test_stop_submitting_at_still_saves_everything_paid(tmp_path: Path,
                                                        make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(queue_seconds=1.0, process_seconds=1.0)
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 30)
    result = run_cli(["run", str(src), "--out", str(out), "--stop-submitting-at", "2s",
                      *FAST_FLAGS, "--max-qps", "4", "--concurrency", "1"], emulator)
    assert result.returncode == 1, result.stderr
    charged = emulator.stats["charged"]
    assert 0 < charged < 30
    assert len(list(out.glob("*.jpg"))) == charged, "every paid result must be saved"
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert {p["reason"] for p in status["problems"]} == {
        "not sent: stop-submitting time reached"}


@pytest.mark.parametrize(("evening", "morning"), [
    ("2026-03-28T22:00:00+01:00", "2026-03-29T07:30:00+02:00"),  # clocks go forward
    ("2026-10-24T22:00:00+02:00", "2026-10-25T07:30:00+01:00"),  # and back
    ("2026-12-05T06:00:00+01:00", "2026-12-05T07:30:00+01:00"),  # later the same day
])
def test_a_clock_time_given_the_evening_the_clocks_change_is_the_mornings(
        evening: str, morning: str) -> None:
    """--deadline 07:30 or --stop-submitting-at 07:30, given in Berlin the evening before
    the clocks change, is 07:30 on the morning's clock, not an hour early or late."""
    code = ("from datetime import datetime; from batch.deadlines import parse_when; "
            f"print(parse_when('07:30', datetime.fromisoformat({evening!r})).isoformat())")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=cli_env(None, extra={"TZ": "Europe/Berlin"}), check=True)
    assert found.stdout.strip() == morning


def test_a_run_says_its_stop_times_with_their_time_zone(tmp_path: Path,
                                                         emulator: Emulator) -> None:
    """A server kept on UTC reads "06:30" as UTC, not as the studio's morning: the run says
    both times at its start, with the zone, so that the log shows it."""
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 1)
    result = run_cli(["run", str(src), "--out", str(out), "--stop-submitting-at", "06:30",
                      "--deadline", "6h", *FAST_FLAGS], emulator,
                     extra_env={"TZ": "Europe/Berlin"})
    assert result.returncode == 0, result.stderr
    zone = r"\((CET, UTC\+0100|CEST, UTC\+0200)\)"
    assert re.search(rf"No upload starts after \d{{4}}-\d\d-\d\d 06:30 {zone}\.",
                     result.stderr), result.stderr
    assert re.search(rf"The run ends by \d{{4}}-\d\d-\d\d \d\d:\d\d {zone}\.",
                     result.stderr), result.stderr


def test_a_stop_time_after_the_deadline_is_said(tmp_path: Path, emulator: Emulator) -> None:
    """The two times swapped in a cron line: uploads would stop at the deadline, earlier than
    the line reads. Said even under -q, and the night still runs."""
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 1)
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin",
                      "--stop-submitting-at", "2h", "--deadline", "1h", "-q", *FAST_FLAGS],
                     emulator)
    assert result.returncode == 0 and emulator.stats["charged"] == 1, result.stderr
    assert re.fullmatch(r"\S+ WARNING --stop-submitting-at \(\d\d:\d\d\) comes after --deadline "
                        r"\(\d\d:\d\d\): the deadline ends the run first, uploads included\.\n",
                        result.stderr), result.stderr


def test_the_deadline_ends_the_run_and_says_what_is_in_flight(tmp_path: Path,
                                                              make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(queue_seconds=1.0, process_seconds=6.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 4)
    report = tmp_path / "report.json"
    result = run_cli(["run", str(src), "--out", str(out), "--deadline", "3s", "--report",
                      str(report), *FAST_FLAGS], emulator, timeout=60)
    assert result.returncode == 1
    assert "Deadline reached: 4 paid job(s) still in flight" in result.stderr
    data = json.loads(report.read_text())
    assert len(data["needs_attention"]) == 4
    assert all("expires" in a["why"] for a in data["needs_attention"])
    final = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator, timeout=60)
    assert final.returncode == 0
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 4, "the rerun must not pay again for work in flight"
    assert_no_double_pay(out, emulator, 4)



def test_a_machine_that_sleeps_mid_run_raises_no_false_alarm(tmp_path: Path,
                                                             make_emulator: MakeEmulator) -> None:
    """A laptop's lid closed, or a VM paused, for a few seconds mid-run: the run carries on
    and finishes, and its cron mail (``-q``: warnings and errors) holds no alarm about a
    ledger database that never went away."""
    emulator = make_emulator(queue_seconds=0.5, process_seconds=1.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 12)
    run = popen_cli(["run", str(src), "--out", str(out), "-q", *FAST_FLAGS, "--max-qps", "4"],
                    emulator)
    assert wait_for(lambda: emulator.stats.get("charged", 0) >= 2, timeout=60)
    run.send_signal(signal.SIGSTOP)
    time.sleep(3.5)
    run.send_signal(signal.SIGCONT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "ledger database" not in err, err
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, 12)


def test_photos_culled_from_the_shoot_are_not_sent_and_stop_being_problems(
        tmp_path: Path, emulator: Emulator) -> None:
    """The photographer deletes rejects (and a stray text file named .jpg) after a night that
    stopped at its budget: the next night sends none of them, lists none of them, and exits 0;
    a delivered photo whose source was deleted keeps its output, and restoring it pays
    nothing."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 5)
    (src / "notes.jpg").write_text("not a photo")
    first = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--max-credits", "2",
                     *FAST_FLAGS], emulator)
    assert first.returncode == 1 and emulator.stats["charged"] == 2
    delivered = sorted(p.name for p in out.glob("*.jpg"))
    waiting = sorted(set(sources) - set(delivered))
    culled = [delivered[0], *waiting[:2], "notes.jpg"]
    backup = {name: (src / name).read_bytes() for name in culled}
    saved = (out / delivered[0]).read_bytes()
    for name in culled:
        (src / name).unlink()
    second = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "-q", *FAST_FLAGS],
                     emulator)
    assert (second.returncode, second.stdout, second.stderr) == (0, "", ""), second
    assert emulator.stats["charged"] == 3  # the one waiting photo that is still there
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted([*delivered, waiting[2]])
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert status["problems"] == [] and status["files"] == 2

    (src / delivered[0]).write_bytes(backup[delivered[0]])  # restored from the backup
    third = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert third.returncode == 0, third.stderr
    assert emulator.stats["charged"] == 3
    assert (out / delivered[0]).read_bytes() == saved
    assert_outputs_right(out, {name: data for name, data in sources.items()
                               if (src / name).exists()}, emulator)


def test_a_shoot_folder_moved_away_or_emptied_is_not_a_problem_every_night_after(
        tmp_path: Path, emulator: Emulator) -> None:
    """After a night stopped at its budget, the Smith shoot (with a product shot the API
    found no face in) is moved to the archive, and the Jones shoot's photos are deleted:
    their failed and waiting photos were listed, "the file disappeared after it was
    scanned", exit 1, every night after. They are forgotten as culled photos are; the shoot
    moved back sends what waits, and pays nothing again."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "smith" / "a.jpg", seed=1)
    Image.new("RGB", (320, 240), (90, 120, 150)).save(src / "smith" / "product.jpg")
    write_portrait(src / "jones" / "c.jpg", seed=2)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    first = run_cli(args, emulator)
    assert first.returncode == 1 and "product.jpg" in first.stdout, first.stdout
    assert emulator.stats["charged"] == 2  # a photo with no face is refused, not charged
    saved = (out / "smith" / "a.jpg").read_bytes()
    write_portrait(src / "smith" / "day two" / "b.jpg", seed=3)
    write_portrait(src / "jones" / "e.jpg", seed=4)
    capped = run_cli([*args, "--max-credits", "0"], emulator)
    assert capped.returncode == 1 and "budget reached" in capped.stdout, capped.stdout
    (tmp_path / "archive").mkdir()
    (src / "smith").rename(tmp_path / "archive" / "smith")
    for photo in (src / "jones").iterdir():
        photo.unlink()
    write_portrait(src / "brown" / "d.jpg", seed=5)
    for night in range(2):
        result = run_cli([*args, "-q"], emulator)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (night, result)
    assert emulator.stats["charged"] == 3  # brown's photo
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert status["problems"] == [] and status["files"] == 1, status

    (tmp_path / "archive" / "smith").rename(src / "smith")
    back = run_cli(args, emulator)
    assert emulator.stats["charged"] == 4  # day two's photo, waiting since the budget
    assert back.returncode == 1, back.stdout + back.stderr
    assert re.findall(r"^  (\w+) +(\S+):", back.stdout, re.M) == [
        ("failed", str(src / "smith" / "product.jpg"))], back.stdout
    assert (out / "smith" / "a.jpg").read_bytes() == saved
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")
                  if ".skinbatch" not in p.parts) == [
        "brown/d.jpg", "jones/c.jpg", "smith/a.jpg", "smith/day two/b.jpg"]


def test_a_source_folder_renamed_is_not_waited_for_every_night_after(
        tmp_path: Path, emulator: Emulator) -> None:
    """"Smith" renamed "Smith wedding" after a night stopped at its budget, a photo culled
    meanwhile: the old name was said to be "not there, its drive unplugged", its photo waited
    for, exit 1, every night after, and status counted each photo twice. The old folder,
    whose photos are under the new name, is forgotten; nothing is paid again."""
    shoots, out = tmp_path / "shoots", tmp_path / "out"
    write_portrait(shoots / "Smith" / "a.jpg", seed=1)
    flags = ["--out", str(out), "--smart-skin", *FAST_FLAGS]
    assert run_cli(["run", str(shoots / "Smith"), *flags], emulator).returncode == 0
    write_portrait(shoots / "Smith" / "culled.jpg", seed=2)
    assert run_cli(["run", str(shoots / "Smith"), *flags, "--max-credits", "0"],
                   emulator).returncode == 1
    (shoots / "Smith" / "culled.jpg").unlink()
    (shoots / "Smith").rename(shoots / "Smith wedding")
    write_portrait(shoots / "Smith wedding" / "b.jpg", seed=3)
    renamed = ["run", str(shoots / "Smith wedding"), *flags]
    assert run_cli(renamed, emulator).returncode in (0, 1)  # its uploads may meet the old name
    night = run_cli([*renamed, "-q"], emulator)
    assert (night.returncode, night.stdout, night.stderr) == (0, "", ""), night
    assert emulator.stats["charged"] == 2  # a, then b
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert status["problems"] == [] and status["files"] == 2, status
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize(("change", "photos"), [("photo", 3), ("options", 22)])
def test_a_paid_result_a_change_leaves_unsaved_is_said(
        tmp_path: Path, make_emulator: MakeEmulator, change: str, photos: int) -> None:
    """After the night's photos were sent and the run was killed, the photographer exports one again
    over itself (a corrected crop), or someone turns on another option: the next run sends
    the photos as they are now and saves their results, and says which paid results are not
    saved, where it left those paid tasks unmentioned (credits spent, said nowhere); past 20
    of them, how many more (each job's history names its own)."""
    emulator = make_emulator(process_seconds=1.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, photos)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    # A run pays for at most UNPROVEN_UPLOADS before it has saved a result: more photos are
    # sent, paid and left unsaved by a second run killed as the first was.
    emulator.config.faults.download_5xx = 1.0
    for sent in (photos, ) if photos <= UNPROVEN_UPLOADS else (UNPROVEN_UPLOADS,
                                                               photos - UNPROVEN_UPLOADS):
        killed = popen_cli(args, emulator, extra_env={"SKINBATCH_CRASH_AFTER": f"queued:{sent}"})
        killed.communicate(timeout=120)
        assert killed.returncode == -signal.SIGKILL
    assert emulator.stats["charged"] == photos
    emulator.config.faults.download_5xx = 0.0
    if change == "photo":
        sources["01.jpg"] = write_portrait(src / "01.jpg", seed=41)
        said = {"01.jpg": "01.jpg changed after it was sent (exported again over itself?): the "
                          "result paid for the earlier version is not saved; the photo as it "
                          "is now is sent."}
    else:
        args.append("--acne-removal")
        said = {name: f"{name}: its options changed after it was sent: the result paid for "
                      "under the earlier ones is not saved; it is sent with these."
                for name in sources}
    rerun = run_cli([*args, "-q"], emulator)
    assert rerun.returncode == 0, rerun.stderr
    assert emulator.stats["charged"] == photos + len(said)
    assert_outputs_right(out, sources, emulator)
    warnings = [line.split(" WARNING ", 1)[1] for line in rerun.stderr.splitlines()
                if "a previous run left unfinished" not in line]  # killed mid-download
    named = {f"{src}/{words}" for words in said.values()}
    assert len(warnings) == min(len(said), 21) and set(warnings[:20]) <= named, rerun.stderr
    assert len(set(warnings[:20])) == min(len(said), 20)
    if len(said) > 20:
        assert warnings[20] == ("... and 2 more paid result(s) not saved, as their photos or "
                                "options changed after they were sent (each job's history in "
                                "the ledger says which).")
    with contextlib.closing(sqlite3.connect(out / ".skinbatch" / "ledger.sqlite")) as db:
        history = db.execute("SELECT message FROM events WHERE message LIKE ?",
                             ("%after this was sent%",)).fetchall()
    assert sorted(m for (m,) in history) == sorted(
        f"{src}/{name}: its {change} changed after this was sent; its result is not saved "
        "unless they come back" for name in said)
    again = run_cli([*args, "-q"], emulator)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert emulator.stats["charged"] == photos + len(said)
    # The morning's reckoning explains every credit: status and the report count these.
    status = run_cli(["status", "--out", str(out)], None)
    assert (f"credits charged (including possible charges): {photos + len(said)}\nof them "
            f"{len(said)} credit(s) paid for results not saved, as their photos or options "
            "changed after they were sent") in status.stdout, status.stdout
    for fmt in ("json", "html"):
        page = tmp_path / f"report.{fmt}"
        assert run_cli(["report", "--out", str(out), "-o", str(page)], None).returncode == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["credits_total"], report["credits_for_results_not_saved"]) == \
        (photos + len(said), len(said))
    assert (f"<p class='warn' id='not-saved'>{len(said)} credit(s) paid for results not saved"
            in (tmp_path / "report.html").read_text())


AWAY_WARNING = ("is not there, its drive unplugged or its share not mounted. Its photos and "
                "their results wait for a run that finds it; the other sources go on.")


def test_a_source_not_there_tonight_holds_up_none_of_the_others(
        tmp_path: Path, emulator: Emulator) -> None:
    """A nightly run over two drives, one not plugged in tonight: the other's new photos are
    sent and saved, the missing one is named (exit 1) and nothing of it is forgotten; the
    night it is back, its new photos go and nothing is paid again. (The whole night was
    refused before, exit 2.) A run or a watch given only sources that are not there is
    still refused."""
    a, b, out = tmp_path / "drive-a" / "shoot", tmp_path / "drive-b" / "shoot2", tmp_path / "out"
    shoot(a, 2)
    for i in range(2):
        write_portrait(b / f"{i:02d}.jpg", seed=20 + i)
    args = ["run", str(a), str(b), "--out", str(out), "--smart-skin", "-q", *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 0 and emulator.stats["charged"] == 4
    write_portrait(a / "new.jpg", seed=50)
    write_portrait(b / "new.jpg", seed=51)
    b.rename(tmp_path / "unplugged")
    tonight = run_cli(args, emulator)
    assert tonight.returncode == 1, tonight.stderr
    assert emulator.stats["charged"] == 5 and (out / "shoot" / "new.jpg").is_file()
    assert f"WARNING {b} {AWAY_WARNING}" in tonight.stderr, tonight.stderr
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert [(p["path"], p["state"]) for p in status["problems"]] == [(str(b), "unreadable")]
    assert status["files"] == 5 and sorted(p.name for p in (out / "shoot2").iterdir()) == [
        "00.jpg", "01.jpg"]
    for only in (["run", str(b)], ["watch", str(b)]):
        refused = run_cli([*only, "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
        assert refused.returncode == 2 and f"source {b} does not exist" in refused.stderr

    (tmp_path / "unplugged").rename(b)
    back = run_cli(args, emulator)
    assert (back.returncode, back.stdout, back.stderr) == (0, "", ""), back.stderr
    assert emulator.stats["charged"] == 6 and (out / "shoot2" / "new.jpg").is_file()
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert status["problems"] == [] and status["files"] == 6


def test_a_dry_run_leaves_a_source_not_there_out_of_its_sums(
        tmp_path: Path, emulator: Emulator) -> None:
    """Photos of a drive not plugged in, waiting since a night whose budget ran out: the dry
    run listed them as rejected ("cannot read the file") and left them out of nothing, where
    the run itself keeps them waiting for the drive and sends the others. A photo with a copy
    on each drive, found first on the missing one, is sent from the other."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    photos = shoot(a, 2)
    for i in range(3):
        write_portrait(b / f"{i:02d}.jpg", seed=20 + i)
    (b / "copy of 00.jpg").write_bytes(photos["00.jpg"])
    args = ["run", str(b), str(a), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    assert run_cli([*args, "--max-credits", "0"], emulator).returncode == 1
    b.rename(tmp_path / "unplugged")
    dry = run_cli([*args, "--dry-run"], emulator)
    assert dry.returncode == 0, dry.stderr
    assert "would send:   2 image(s), about 2 credit(s)" in dry.stdout, dry.stdout
    assert "would reject: 0" in dry.stdout and str(b / "00.jpg") not in dry.stdout
    assert (f"{b} is not there, its drive unplugged or its share not mounted: its photos wait "
            "for a run that finds it, and are not counted here.") in dry.stdout, dry.stdout
    assert "No photos in" not in dry.stdout
    assert emulator.stats.get("charged", 0) == 0


def ended_without_b_then_with_it(run: subprocess.Popen[str], emulator: Emulator,
                                 args: list[str], sources: dict[str, bytes],
                                 paid: tuple[int, int]) -> None:
    """``run`` (``args``: over the sources ``a`` and ``b``, whose ``b`` was moved to
    ``unplugged`` beside it mid-run) ends with b named and a's photos saved, ``paid[0]``
    charged; b plugged in again, the same command saves every photo, ``paid[1]`` in all."""
    out = Path(args[args.index("--out") + 1])
    b = next(Path(arg) for arg in args if arg.endswith("/b"))
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    assert f"WARNING {b} {AWAY_WARNING}" in stderr and "Traceback" not in stderr
    assert emulator.stats["charged"] == paid[0]
    assert sorted(f"a/{p.name}" for p in (out / "a").iterdir()) == sorted(
        rel for rel in sources if rel.startswith("a/"))
    assert not (out / "b").exists() or list((out / "b").iterdir()) == []
    (b.parent / "unplugged").rename(b)
    back = run_cli(args, emulator)
    assert back.returncode == 0, back.stderr
    assert emulator.stats["charged"] == paid[1]
    assert_outputs_right(out, sources, emulator)


def test_a_source_that_goes_away_mid_run_leaves_the_others_to_finish(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A drive unplugged while its paid results are on their way: the other source's results
    are saved and the run ends (exit 1, the drive named) where it stopped whole before;
    the drive's results wait, not paid again, and are saved with its photos' metadata by
    the next run once it is back."""
    emulator = make_emulator(process_seconds=600)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    sources = {f"a/{name}": data for name, data in shoot(a, 2).items()}
    sources.update({f"b/{i:02d}.jpg": write_portrait(b / f"{i:02d}.jpg", seed=20 + i)
                    for i in range(2)})
    args = ["run", str(b), str(a), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    killed = popen_cli(args, emulator, extra_env={"SKINBATCH_CRASH_AFTER": "queued:4"})
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL and emulator.stats["charged"] == 4
    queries = emulator.stats.get("queries", 0)
    rerun = popen_cli(args, emulator)
    assert wait_for(lambda: emulator.stats.get("queries", 0) > queries)
    b.rename(tmp_path / "unplugged")
    for task in list(emulator.state.tasks.values()):
        task.queued_until = task.ready_at = 0.0
    ended_without_b_then_with_it(rerun, emulator, args, sources, paid=(4, 4))


def test_a_source_unplugged_before_its_photos_are_sent_leaves_the_others_to_go(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A drive unplugged after the run started and before its photos' turn: they wait,
    pending, and the other source's photos are sent (the run stopped whole before)."""
    emulator = make_emulator(faults={"credits_refused": 2})  # the first upload waits 2 s
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    sources = {f"a/{name}": data for name, data in shoot(a, 3).items()}
    sources.update({f"b/{i:02d}.jpg": write_portrait(b / f"{i:02d}.jpg", seed=20 + i)
                    for i in range(2)})
    args = ["run", str(a), str(b), "--out", str(out), "--smart-skin", "--concurrency", "1",
            *FAST_FLAGS]
    scanned = popen_cli([*args, "--max-credits", "0"], emulator,
                        extra_env={"SKINBATCH_CRASH_AFTER": "scanned:1"})
    scanned.communicate(timeout=120)
    assert scanned.returncode == -signal.SIGKILL
    # Three uploads at most are under way or being prepared (one at a time, two copies
    # ahead): b's photos are read only once one of a's has been sent, after the balance.
    run = popen_cli(args, emulator)
    assert wait_for(lambda: emulator.stats.get("credit_queries", 0) >= 1)
    b.rename(tmp_path / "unplugged")
    ended_without_b_then_with_it(run, emulator, args, sources, paid=(3, 5))


def test_photos_a_run_could_not_read_are_read_again_by_the_next_one(
        tmp_path: Path, emulator: Emulator) -> None:
    """The share goes away mid-night (here: the files lose their read permission between the
    scan and their upload): those photos are listed with the reason, and the next night, the
    share back, reads and sends them: they do not stay rejected for good."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 4)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    first = run_cli([*args, "--max-credits", "1"], emulator, as_plain_user=True)
    assert first.returncode == 1 and emulator.stats["charged"] == 1
    waiting = [name for name in sources if not (out / name).exists()]
    for name in waiting:
        (src / name).chmod(0)
    try:
        away = run_cli(args, emulator, as_plain_user=True)
    finally:
        for name in waiting:
            (src / name).chmod(0o644)
    assert away.returncode == 1 and emulator.stats["charged"] == 1
    assert away.stdout.count("permission denied: the file cannot be read") == 3, away.stdout
    planned = run_cli([*args, "--dry-run"], emulator, as_plain_user=True)
    assert "would send:   3 image(s)" in planned.stdout, planned.stdout
    assert "would reject: 0" in planned.stdout, planned.stdout
    back = run_cli(args, emulator, as_plain_user=True)
    assert back.returncode == 0, back.stdout + back.stderr
    assert emulator.stats["charged"] == 4
    assert_outputs_right(out, sources, emulator)


def test_a_photo_whose_bytes_no_longer_give_its_key_is_read_again_by_the_next_run(
        tmp_path: Path, emulator: Emulator) -> None:
    """A photo edited after its scan, in a way its size and time do not show (or keyed by a
    rule a new version reads otherwise): its job's key matches no file, so it is not sent.
    It does not stay so for good (the scan skips a file it has read): the next run reads it
    as new, and it is sent as the photo it is."""
    import os

    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 2)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    scanned = run_cli(args, emulator, extra_env={"SKINBATCH_CRASH_AFTER": "scanned:1"})
    assert scanned.returncode != 0 and emulator.stats.get("charged", 0) == 0
    edited = src / "01.jpg"
    before = edited.stat()
    data = bytearray(edited.read_bytes())
    data[-3] ^= 0xFF  # in the last bytes of the image data: the same size, other pixels
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    sources["01.jpg"] = bytes(data)
    first = run_cli(args, emulator)
    assert first.returncode == 1, first.stdout
    assert "01.jpg: the file changed after it was scanned; the next run reads it again" \
        in first.stdout
    assert emulator.stats["charged"] == 1
    planned = run_cli([*args, "--dry-run"], emulator)
    assert "would send:   1 image(s)" in planned.stdout, planned.stdout
    assert "would reject: 0" in planned.stdout, planned.stdout
    second = run_cli(args, emulator)
    assert second.returncode == 0, second.stdout + second.stderr
    assert emulator.stats["charged"] == 2
    assert_outputs_right(out, sources, emulator)


def rejected_count(out: Path) -> int:
    status = run_cli(["status", "--out", str(out), "--json"], None)
    return int(json.loads(status.stdout)["counts"].get("rejected", 0))


def test_a_watch_reads_again_the_photos_it_could_not_read_once_they_read(
        tmp_path: Path, emulator: Emulator) -> None:
    """A watch runs for days: photos it could not read (a share away, a permission) are sent
    once they read again, without a restart; while they still cannot be read they stay listed
    and nothing is paid for them."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = shoot(src, 3)
    first = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--max-credits", "1",
                     *FAST_FLAGS], emulator)
    assert first.returncode == 1 and emulator.stats["charged"] == 1
    waiting = [name for name in sources if not (out / name).exists()]
    for name in waiting:
        (src / name).chmod(0)
    watch = popen_cli(["watch", str(src), "--out", str(out), "--smart-skin", "--settle", "0.2",
                       "--rescan", "0.5", *FAST_FLAGS], emulator, as_plain_user=True)
    try:
        assert wait_for(lambda: rejected_count(out) == len(waiting))
        time.sleep(2)  # several passes of the watch with the files still unreadable
        assert emulator.stats["charged"] == 1 and rejected_count(out) == len(waiting)
        for name in waiting:
            (src / name).chmod(0o644)
        assert wait_for(lambda: all((out / name).exists() for name in waiting))
    finally:
        for name in waiting:
            (src / name).chmod(0o644)
        watch.send_signal(signal.SIGINT)
        _, stderr = watch.communicate(timeout=60)
    assert emulator.stats["charged"] == 3, stderr[-3000:]
    assert_outputs_right(out, sources, emulator)
    assert stderr.count("permission denied: the file cannot be read") == len(waiting), stderr
    assert f"Reading again {len(waiting)} file(s)" in stderr, stderr

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def browser_or_skip() -> str:
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium not installed")
    return browser


def test_the_html_report_renders_in_a_real_browser(tmp_path: Path, emulator: Emulator) -> None:
    """The batch as a whole in the header (a no-op rerun does not hide it), labelled pairs,
    a name in Japanese, previews made when the results were saved, and a click-through
    full-size comparison; nothing fetched from the network."""
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 4)
    write_portrait(src / "花子の肖像.jpg", seed=11)
    (src / "bad.jpg").write_bytes(b"")
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 1
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 1
    previews = sorted((out / ".skinbatch" / "thumbs").rglob("*.jpg"))
    assert len(previews) == 10, "a before and an after preview per image, made at save time"
    made = {p: p.stat().st_mtime_ns for p in previews}
    page = tmp_path / "report.html"
    result = run_cli(["report", "--out", str(out), "--format", "html", "-o", str(page)], None)
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in previews} == made, "the report made none again"
    source = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\(|@import""", source)
    assert "base64" not in source, "previews are files beside the ledger, not inlined"
    fonts = re.search(r"font:[^;]*;", source)
    assert fonts and "Noto Sans CJK" in fonts.group(0) and "Microsoft YaHei" in fonts.group(0)
    browser = browser_or_skip()
    flags = [*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}"]
    url = page.as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count('class="thumb"') == 10, "a before/after pair for each of 5 images"
    assert dom.count("<figcaption>before</figcaption>") == 5
    assert dom.count("<figcaption>after</figcaption>") == 5
    assert 'data-state="done">5<' in dom and 'data-state="rejected">1<' in dom
    assert "bad.jpg" in dom and "the file is empty" in dom
    assert "花子の肖像.jpg" in dom
    summary = re.search(r'id="batch-summary">(.*?)</p>', dom)
    assert summary and "6 file(s)" in summary.group(1) and "2 run(s)" in summary.group(1)
    assert re.search(r"<b>5</b>credits charged in all", dom)
    assert "credits charged in that run 0" in dom  # the no-op rerun, below the batch figures
    for thumb in re.findall(r'class="thumb" alt="\w+" loading="lazy" src="([^"]+)"', dom):
        assert (page.parent / unquote(thumb)).resolve().is_file(), thumb
    viewed = subprocess.run([browser, *flags, "--dump-dom", url + "#view=4"],
                            capture_output=True, text=True, timeout=120).stdout
    assert 'id="viewer" role="dialog" aria-label="before and after" class="open"' in viewed
    full = dict(re.findall(r'<img class="(before|after)" alt="\w+"[^>]* src="([^"]+)"', viewed))
    assert full["before"] == (src / "花子の肖像.jpg").as_uri()
    assert (page.parent / unquote(full["after"])).resolve() == (out / "花子の肖像.jpg").resolve()
    ARTIFACTS.mkdir(exist_ok=True)
    for name, address, size in (("report.png", url, "1200,1000"),
                                 ("report-pair.png", url + "#view=4", "1400,800"),
                                 ("report-slider.png", url + "#view=0&slider", "1000,700")):
        shot = ARTIFACTS / name
        shot.unlink(missing_ok=True)
        subprocess.run([browser, *flags, f"--screenshot={shot}", f"--window-size={size}",
                        address], capture_output=True, timeout=120)
        assert shot.is_file() and shot.stat().st_size > 10_000


def test_a_report_makes_the_previews_a_save_did_not(tmp_path: Path, emulator: Emulator) -> None:
    """Results saved without previews (an older ledger, a deleted folder) get them from the
    files, once."""
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 3)
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    shutil.rmtree(out / ".skinbatch" / "thumbs")
    assert run_cli(["report", "--out", str(out)], None).returncode == 0
    previews = list((out / ".skinbatch" / "thumbs").rglob("*.jpg"))
    assert len(previews) == 6
    for preview in previews:
        with Image.open(preview) as image:
            assert image.format == "JPEG" and max(image.size) <= 240


def test_csv_and_json_reports_parse_back(tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 3)
    (src / "bad.jpg").write_text("nope")
    run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    for fmt in ("csv", "json"):
        assert run_cli(["report", "--out", str(out), "--format", fmt], None).returncode == 0
    rows = list(csv.DictReader(io.StringIO((out / "skinbatch-report.csv").read_text())))
    assert len(rows) == 4
    assert {r["state"] for r in rows} == {"done", "rejected"}
    data = json.loads((out / "skinbatch-report.json").read_text())
    assert data["counts"]["done"] == 3 and data["credits_total"] == 3
    assert data["last_run"]["charged"] == 3 and data["last_run"]["exit_code"] == 1
    # Given a file by -o alone, the report is written in the format its name says.
    for name in ("night.csv", "night.json"):
        assert run_cli(["report", "--out", str(out), "-o", str(tmp_path / name)],
                       None).returncode == 0
    assert (tmp_path / "night.csv").read_text() == (out / "skinbatch-report.csv").read_text()
    assert json.loads((tmp_path / "night.json").read_text())["files"] == data["files"]


def test_a_report_goes_into_a_pipe_or_through_a_link_and_leaves_them_be(
        tmp_path: Path, emulator: Emulator) -> None:
    """-o a pipe (as /dev/stdout is) gets the report written into it, where a temp file
    renamed over it would replace the pipe itself (as root, /dev/stdout too); -o a link gets
    the file it points to replaced, the link kept."""
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 2)
    assert run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                   emulator).returncode == 0
    fifo = tmp_path / "report.pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        piped = run_cli(["report", "--out", str(out), "--format", "csv", "-o", str(fifo)], None)
        received = os.read(reader, 1 << 16).decode()
    finally:
        os.close(reader)
    assert piped.returncode == 0, piped.stderr
    assert fifo.is_fifo() and not list(tmp_path.glob(".report.pipe*"))
    assert {row["state"] for row in csv.DictReader(io.StringIO(received))} == {"done"}
    assert piped.stdout == ""  # the confirmation goes to stderr: stdout may be the report

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "night.json").write_text("{}")
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "reports" / "night.json")
    linked = run_cli(["report", "--out", str(out), "--format", "json", "-o", str(link)], None)
    assert linked.returncode == 0, linked.stderr
    assert link.is_symlink()
    assert json.loads((tmp_path / "reports" / "night.json").read_text())["counts"]["done"] == 2


def test_retry_puts_chosen_jobs_back_in_line(tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one.jpg").write_text("not yet a photo")
    (src / "two.jpg").write_text("not yet a photo either")
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 1
    write_portrait(src / "a" / "one.jpg", seed=1)
    os.utime(src / "a" / "one.jpg", ns=(1, 1))
    only = run_cli(["retry", "--out", str(out), "--rejected", str(src / "two.jpg")], None)
    assert only.returncode == 0 and "1 job(s)" in only.stdout
    nothing = run_cli(["retry", "--out", str(out)], None)
    assert nothing.returncode == 2


def test_retry_of_a_folder_puts_back_the_photos_in_it(tmp_path: Path,
                                                     emulator: Emulator) -> None:
    """"Send the Smith shoot's failures again": a folder given to retry stands for every
    photo under it (and no other folder whose name starts the same)."""
    src, out = tmp_path / "src", tmp_path / "out"
    for rel in ("smith/one.jpg", "smith/day2/two.jpg", "smithson/three.jpg", "four.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"{rel}: not yet a photo")
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 1
    result = run_cli(["retry", "--out", str(out), "--rejected", str(src / "smith")], None)
    assert result.returncode == 0, result.stderr
    assert "2 job(s) put back in line" in result.stdout
    ledger = ledger_of(out)
    try:
        assert ledger.counts()["pending"] == 2 and ledger.counts()["rejected"] == 2
    finally:
        ledger.close()


def test_photos_a_person_dismissed_stop_making_every_night_fail(tmp_path: Path,
                                                                emulator: Emulator) -> None:
    """Product shots the API finds no face in, and a file that is no photo, stay in the
    shoot: each night after exited 1 and its cron mail named them again. Dismissed (a folder
    or a file), they are no longer listed nor make a night fail; status and the report still
    account for them; retry sends one again, and what it finds is listed again."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg", seed=1)
    (src / "products").mkdir()
    for name, shade in (("bag.jpg", 40), ("shoe.jpg", 80)):
        Image.new("RGB", (320, 240), (shade, 120, 150)).save(src / "products" / name)
    (src / "notes.jpg").write_text("not a photo")
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 1
    assert emulator.stats["submits"] == 3

    folder = run_cli(["dismiss", "--out", str(out), str(src / "products")], None)
    assert (folder.returncode, folder.stdout) == (
        0, "2 photo(s) dismissed: no longer listed as needing a person.\n"), folder
    night = run_cli([*args, "-q"], emulator)
    assert night.returncode == 1 and "notes.jpg" in night.stderr, night.stderr
    assert "bag.jpg" not in night.stderr and "shoe.jpg" not in night.stderr, night.stderr
    assert run_cli(["dismiss", "--out", str(out), str(src / "notes.jpg")], None).returncode == 0
    quiet = run_cli([*args, "-q"], emulator)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", ""), quiet
    assert emulator.stats["submits"] == 3  # nothing sent again

    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert status["problems"] == [] and status["dismissed"] == [
        str(src / "notes.jpg"), str(src / "products" / "bag.jpg"),
        str(src / "products" / "shoe.jpg")], status
    assert "dismissed (accepted unretouched, not listed): 3 file(s)" in run_cli(
        ["status", "--out", str(out)], None).stdout
    assert run_cli(["report", "--out", str(out), "--format", "json"], None).returncode == 0
    report = json.loads((out / "skinbatch-report.json").read_text())
    assert sorted(Path(r["source"]).name for r in report["files"]
                  if "(dismissed: accepted unretouched)" in r["reason"]) == [
        "bag.jpg", "notes.jpg", "shoe.jpg"], report["files"]
    again = run_cli(["dismiss", "--out", str(out), str(src / "a.jpg")], None)
    assert again.returncode == 1 and "nothing was dismissed" in again.stderr, again

    retried = run_cli(["retry", "--out", str(out), "--failed", str(src / "products" / "bag.jpg")],
                      None)
    assert retried.returncode == 0, retried.stderr
    after = run_cli([*args, "-q"], emulator)
    assert after.returncode == 1 and emulator.stats["submits"] == 4
    assert "bag.jpg" in after.stderr and "shoe.jpg" not in after.stderr, after.stderr


def test_json_logs_are_one_object_per_line(tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    shoot(src, 2)
    result = run_cli(["run", str(src), "--out", str(out), "--log-format", "json", "-v",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 0
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)


def test_a_photo_sent_as_it_is_has_sharp_previews_of_each_side(
        tmp_path: Path, emulator: Emulator) -> None:
    """The previews of a photo that goes as it is are made from the pixels its checks decode
    at a reduced size, never smaller than a preview: 240 px on the long side for a photo
    whose eighth would be 200."""
    src, out = tmp_path / "src", tmp_path / "out"
    data = write_portrait(src / "studio.jpg", size=(1600, 1200), grain=8)
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    thumbs = out / ".skinbatch" / "thumbs"
    result = hashlib.sha256((out / "studio.jpg").read_bytes()).hexdigest()
    for sha in (identity_digest(data), result):
        with Image.open(thumbs / sha[:2] / f"{sha}.jpg") as preview:
            assert preview.format == "JPEG" and preview.size == (240, 180)
    assert len(list(thumbs.rglob("*.jpg"))) == 2


def test_a_photo_sent_as_a_copy_has_an_upright_preview_of_each_side(
        tmp_path: Path, emulator: Emulator) -> None:
    """A sideways camera file (EXIF orientation 6) and a TIFF go to the API as upright JPEG
    copies; their previews, made from the copies' pixels, stand upright too."""
    src, out = tmp_path / "src", tmp_path / "out"
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = write_portrait(src / "sideways.jpg", size=(300, 200), exif=exif.tobytes())
    tiff = write_portrait(src / "scan.tif", fmt="TIFF", size=(200, 300), seed=3)
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    thumbs = out / ".skinbatch" / "thumbs"
    for data in (sideways, tiff):
        sha = identity_digest(data)  # a source's preview is kept under its photo's identity
        with Image.open(thumbs / sha[:2] / f"{sha}.jpg") as preview:
            assert preview.format == "JPEG" and preview.size == (160, 240)
    assert len(list(thumbs.rglob("*.jpg"))) == 4
