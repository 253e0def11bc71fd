"""What a newcomer hits in the first hour: anything that would make a paid result
undeliverable is refused before the first upload (exit 2, nothing sent, nothing created), and
what would be paid for in silence (no option on, no photo found) is said before it is."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from batch.emulator import Emulator
from batch.states import JobState
from tests.conftest import FAST_FLAGS, CliResult, MakeEmulator, cli_env, run_cli
from tests.imagegen import encode, portrait, write_portrait


def shoot(src: Path, n: int = 3, first: int = 0) -> None:
    for i in range(first, first + n):
        write_portrait(src / f"portrait {i}.jpg", seed=i)


def outputs(out: Path) -> list[str]:
    """The photos written under ``out`` (its ``.skinbatch`` folder aside), as relative paths."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")
                  if p.relative_to(out).parts[0] != ".skinbatch")


def assert_refused(result: CliResult, emulator: Emulator, words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr
    assert emulator.stats.get("submits", 0) == 0 and emulator.stats.get("charged", 0) == 0


def test_an_output_folder_inside_the_source_is_refused_before_anything_is_created(
        tmp_path: Path, emulator: Emulator) -> None:
    src = tmp_path / "Studio Shoot"
    shoot(src)
    before = sorted(p.name for p in src.rglob("*"))
    result = run_cli(["run", str(src), "--out", str(src / "retouched"), "--smart-skin",
                      *FAST_FLAGS], emulator)
    assert_refused(result, emulator, "is inside the source folder")
    assert sorted(p.name for p in src.rglob("*")) == before  # no ledger, no empty tree


def test_an_output_folder_whose_drive_is_not_there_is_refused_not_made(
        tmp_path: Path, emulator: Emulator) -> None:
    """--out on a drive not plugged in (its mount point gone with it): making the folders
    would start a new ledger on the system disk and pay again for every photo. --out is
    made; the folders above it never are."""
    src, media = tmp_path / "shoot", tmp_path / "media"
    shoot(src)
    media.mkdir()
    result = run_cli(["run", str(src), "--out", str(media / "USB-DRIVE" / "retouched"),
                      "--smart-skin", *FAST_FLAGS], emulator)
    assert_refused(result, emulator, f"the folder it would be made in, {media / 'USB-DRIVE'}, "
                                     "does not exist (is its drive or share mounted?)")
    assert list(media.iterdir()) == []
    result = run_cli(["run", str(src), "--out", str(media / "retouched"), "--smart-skin",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr  # a new --out in a folder that is there


def test_a_source_inside_the_output_folder_is_refused_unless_asked_for(
        tmp_path: Path, emulator: Emulator) -> None:
    out = tmp_path / "out1"
    shoot(out / "session-A")
    result = run_cli(["run", str(out / "session-A"), "--out", str(out), "--smart-skin",
                      *FAST_FLAGS], emulator)
    assert_refused(result, emulator, "is inside --out")
    config = tmp_path / "on-purpose.toml"
    config.write_text("allow_source_inside_out = true\n")
    result = run_cli(["run", str(out / "session-A"), "--out", str(out), "--config", str(config),
                      "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert emulator.stats["submits"] == 3


def test_a_source_whose_path_is_not_utf8_is_refused_by_name(tmp_path: Path,
                                                           emulator: Emulator) -> None:
    """A folder named in another system's encoding (Latin-1 from an old share) cannot be
    recorded: it is refused at the start with its name shown, not a traceback."""
    src = Path(os.fsdecode(os.fsencode(tmp_path) + b"/S\xe9ance 12"))
    shoot(src)
    result = run_cli(["run", str(src), "--out", str(tmp_path / "out"), "--smart-skin",
                      *FAST_FLAGS], emulator)
    assert_refused(result, emulator, "S\\xe9ance 12 is not valid UTF-8")


def test_a_ledger_that_cannot_be_opened_is_one_clear_sentence(tmp_path: Path,
                                                             emulator: Emulator) -> None:
    """A PostgreSQL server that is down, a driver not installed, a ledger file another user
    owns (kept private: it holds the result links), a ledger in a folder this user may not
    write in, a --ledger that is not a ledger: each is one sentence naming the ledger and
    the cause, exit 2, nothing sent, for every command."""
    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 1)
    down = "postgresql://postgres@127.0.0.1:1/test"
    for command in (["run", str(src), "--smart-skin", *FAST_FLAGS], ["status"], ["report"],
                    ["retry", "--failed"]):
        result = run_cli([*command, "--out", str(out), "--ledger", down], emulator)
        assert_refused(result, emulator, f"cannot open the ledger {down}: ")
        assert "Connection refused" in result.stderr
    no_driver = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['psycopg'] = None; "
         "from batch.cli import main; main()", "status", "--out", str(out), "--ledger", down],
        capture_output=True, text=True, env=cli_env(emulator), timeout=60)
    assert_refused(CliResult(no_driver.returncode, no_driver.stdout, no_driver.stderr),
                   emulator, "pip install 'skinbatch[postgres]'")
    result = run_cli(["run", str(src), "--out", str(out), "--ledger", "mysql://u:pw@db/x",
                      "--smart-skin"], emulator)
    assert_refused(result, emulator, "mysql://u:***@db/x cannot hold a ledger: give a SQLite")
    locked = tmp_path / "not ours"
    locked.mkdir(mode=0o555)
    result = run_cli(["run", str(src), "--out", str(tmp_path / "out2"), "--ledger",
                      str(locked / "ledger.sqlite"), "--smart-skin", *FAST_FLAGS], emulator,
                     as_plain_user=True)
    assert_refused(result, emulator, f"cannot make the ledger's lock {locked}/ledger.lock: "
                                     "Permission denied (this user may not write in that "
                                     "folder)")

    first = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                    emulator)
    assert first.returncode == 0, first.stderr
    ledger = out / ".skinbatch" / "ledger.sqlite"
    os.chown(ledger, 65534, 65534)  # nobody's, mode 600
    for command in (["status"], ["report"]):
        result = run_cli([*command, "--out", str(out)], emulator, as_plain_user=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"cannot open the ledger {ledger}: " in result.stderr
        assert "only its owner (nobody) may open it" in result.stderr
    os.chown(ledger, 0, 0)

    photo = src / "portrait 0.jpg"
    result = run_cli(["status", "--out", str(out), "--ledger", str(photo)], emulator)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot open the ledger {photo}: file is not a database" in result.stderr


def test_an_output_that_cannot_be_written_is_one_clear_sentence(
        tmp_path: Path, emulator: Emulator) -> None:
    src = tmp_path / "shoot"
    shoot(src, 1)
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    result = run_cli(["run", str(src), "--out", str(a_file), "--smart-skin", *FAST_FLAGS],
                     emulator)
    assert_refused(result, emulator, "exists and is not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    result = run_cli(["run", str(src), "--out", str(locked / "out"), "--smart-skin",
                      *FAST_FLAGS], emulator, as_plain_user=True)
    assert_refused(result, emulator, "cannot write to the output folder")
    assert len(result.stderr.strip().splitlines()) == 1


def test_retry_of_a_path_that_matches_nothing_says_so(tmp_path: Path,
                                                       emulator: Emulator) -> None:
    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 1)
    assert run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                   emulator).returncode == 0
    result = run_cli(["retry", "--out", str(out), "--failed", str(src / "nope.jpg")], None)
    assert result.returncode == 1
    assert "nothing was put back in line" in result.stderr


def test_a_task_the_api_no_longer_knows_follows_on_expired(tmp_path: Path,
                                                           make_emulator: MakeEmulator) -> None:
    """The ledger holds queued tasks a server that started anew has forgotten (404 on the
    status query): a lost task, handled like an expired link, never a silent failure."""
    from tests.checks import ledger_of
    from tests.conftest import popen_cli

    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 4)
    first = make_emulator(queue_seconds=30.0)  # tasks stay queued until the kill
    crashed = popen_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                        first, extra_env={"SKINBATCH_CRASH_AFTER": "queued:4"})
    crashed.communicate(timeout=60)
    assert first.stats["charged"] == 4
    report = tmp_path / "report.toml"
    report.write_text('on_expired = "report"\n')
    forgetful = make_emulator()
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(report),
                      "--smart-skin", *FAST_FLAGS], forgetful)
    assert result.returncode == 1
    assert "no longer knows this task" in result.stdout
    assert forgetful.stats.get("submits", 0) == 0
    ledger = ledger_of(out)
    assert ledger.counts()["expired"] == 4
    ledger.close()
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                     forgetful)
    assert result.returncode == 0, result.stdout + result.stderr
    assert forgetful.stats["charged"] == 4
    ledger = ledger_of(out)
    assert ledger.counts()["done"] == 4 and ledger.charges() == 8  # both charges recorded
    ledger.close()


def test_quiet_prints_errors_only_and_a_normal_run_says_where_results_are(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 2)
    (src / "notes.jpg").write_text("not a photo")
    quiet = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "-q", *FAST_FLAGS],
                    emulator)
    assert quiet.returncode == 1  # the rejected file: the exit code says it, and so does
    # the run (cron mails what is said, not an exit code), as a warning with its reason
    assert quiet.stdout == "" and "Traceback" not in quiet.stderr
    [said] = [line for line in quiet.stderr.splitlines() if "notes.jpg" in line]
    assert "WARNING rejected" in said and "not an image" in said.lower(), said
    clean_src = tmp_path / "clean"
    shoot(clean_src, 2, first=10)  # another shoot's photos
    clean = run_cli(["run", str(clean_src), "--out", str(tmp_path / "clean-out"),
                     "--smart-skin", "-q", *FAST_FLAGS], emulator)
    assert (clean.returncode, clean.stdout, clean.stderr) == (0, "", "")  # a clean night
    loud = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert f"Results are in {out.resolve()}." in loud.stdout
    assert f"skinbatch report --out {out}" in loud.stdout
    assert "notes.jpg" in loud.stdout
    assert "slow disk" not in loud.stderr  # no warning about a disk that is fine


def test_a_clean_night_against_the_apis_rate_limit_is_silent_under_quiet(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Finding the API's rate limit is the pace's everyday work: the 429s that show it cost a
    retry and no credit, and the cron job's mail of a night that went well stays empty."""
    limited = make_emulator(qps_limit=8)
    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 30)
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "-q", *FAST_FLAGS],
                     limited)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert limited.stats["rate_limited"] > 0 and limited.stats["charged"] == 30
    assert len(list(out.glob("*.jpg"))) == 30


def test_every_log_line_is_json_with_the_bundled_emulator(tmp_path: Path) -> None:
    import json

    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 1)
    result = run_cli(["run", str(src), "--out", str(out), "--emulator", "--log-format", "json",
                      "--no-progress", "--poll-interval", "0.2"], None, key=None)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["message"] for line in lines)
    assert any("bundled emulator" in json.loads(line)["message"] for line in lines)
    assert "(1 file scanned, 1 read)" in result.stdout, result.stdout


def test_config_messages_are_plain_english(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("concurrency = 'four'\n")
    shoot(tmp_path / "shoot", 1)
    result = run_cli(["run", str(tmp_path / "shoot"), "--out", str(tmp_path / "out"),
                      "--config", str(config), "--emulator"], None, key=None)
    assert result.returncode == 2
    assert "concurrency must be a whole number, not 'four'" in result.stderr


def test_the_readme_command_resumes_after_a_kill_with_the_bundled_emulator(
        tmp_path: Path) -> None:
    """`skinbatch run ... --emulator`, killed with tasks queued, then the same command again:
    the bundled emulator keeps its tasks beside the ledger, so the rerun polls and saves them
    instead of finding them gone and paying again."""
    from tests.checks import ledger_of
    from tests.conftest import cli_env

    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 6)
    args = ["run", str(src), "--out", str(out), "--emulator", "--smart-skin", "--no-progress",
            "--poll-interval", "0.2"]
    env = cli_env(None, key=None, extra={"SKINBATCH_CRASH_AFTER": "queued:3"})
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, "-m", "batch", *args], env=env, timeout=120,
                            capture_output=True, text=True)
    assert killed.returncode == -9
    again = run_cli(args, None, key=None)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ERROR_TASK_NOT_EXISTS" not in again.stdout + again.stderr
    ledger = ledger_of(out)
    try:
        assert ledger.counts()["done"] == 6
        # the three queued before the kill were polled, not sent again: at most the uploads
        # under way at the kill (ambiguous, counted) were paid twice
        assert ledger.charges() <= 6 + ledger.ambiguous_events()
        assert not [e for j in ledger.jobs_in(list(JobState)) for e in ledger.history(j.id)
                    if e["to_state"] == "expired"]
    finally:
        ledger.close()
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(p.name for p in src.glob("*.jpg"))


def test_files_preflight_refuses_are_rejected_at_scan_and_the_estimate_is_the_charge(
        tmp_path: Path, emulator: Emulator) -> None:
    """Corrupt, empty and not-an-image files are rejected when scanned: they are in no credit
    estimate and no budget, and the estimate (dry run and run) equals what is charged."""
    import re

    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 5)
    good = (src / "portrait 0.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("a text file named like a photo")
    dry = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--dry-run",
                   *FAST_FLAGS], emulator)
    assert "would send:   5 image(s)" in dry.stdout, dry.stdout
    assert "would reject: 3" in dry.stdout
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--max-credits", "5",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 1  # the three rejected, listed with their reasons
    estimate = re.search(r"Credits: (\d+) image\(s\) to pay for", result.stderr)
    assert estimate is not None and int(estimate.group(1)) == 5 == emulator.stats["charged"]
    assert "budget reached" not in result.stdout + result.stderr
    for name, why in (("truncated.jpg", "damaged or truncated"), ("empty.jpg", "empty"),
                      ("notes.jpg", "not an image")):
        assert re.search(rf"rejected +{re.escape(str(src))}/{name}: .*{why}", result.stdout), \
            result.stdout
    assert emulator.stats["submits"] == 5


def test_a_damaged_file_that_needs_a_copy_is_rejected_before_its_upload(
        tmp_path: Path, emulator: Emulator) -> None:
    """An oversized or sideways file is decoded once, for the copy that is sent: damage found
    then is a rejection with its reason, as at scan time, and nothing is sent or charged."""
    import re

    from PIL import Image

    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 2)
    wide = encode(portrait(4200, 300), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encode(portrait(300, 200), "JPEG", exif=exif.tobytes())
    (src / "wide cut.jpg").write_bytes(wide[: len(wide) // 2])
    (src / "sideways cut.jpg").write_bytes(sideways[: len(sideways) // 2])
    (src / "wide.jpg").write_bytes(wide)
    dry = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--dry-run",
                   *FAST_FLAGS], emulator)
    assert "would send:   3 image(s)" in dry.stdout and "would reject: 2" in dry.stdout, dry.stdout
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 1
    for name in ("wide cut.jpg", "sideways cut.jpg"):
        assert re.search(rf"rejected +{re.escape(str(src))}/{name}: .*damaged or truncated",
                         result.stdout), result.stdout
    assert emulator.stats["submits"] == 3 == emulator.stats["charged"]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["portrait 0.jpg", "portrait 1.jpg",
                                                        "wide.jpg"]


def test_a_black_and_white_export_in_16_bits_goes_as_its_picture_and_32_bits_are_refused(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """16-bit grey (TIFF or PNG, as black-and-white exports are saved) is sent as an 8-bit copy
    of its pixels, not clipped to a white frame; 32-bit and unreadable TIFFs are refused at
    scan with their reasons and cost nothing."""
    import io
    import re

    from PIL import Image, ImageChops, ImageStat

    from tests.checks import uploaded_image

    src, out = tmp_path / "bw", tmp_path / "out"
    src.mkdir()
    grey = portrait(300, 400, seed=2).convert("L")
    deep = grey.convert("I").point(lambda v: v * 257)
    deep.convert("I;16").save(src / "bw 16-bit.tif")
    deep.convert("I;16").save(src / "bw 16-bit.png")
    grey.convert("F").point(lambda v: v / 255).save(src / "hdr float.tif")
    deep.point(lambda v: v * 65537).save(src / "hdr int.tif")
    portrait(seed=3).save(src / "odd layout.tif", tiffinfo={339: (3, 3, 3)})  # float bytes
    emulator = make_emulator(record_uploads=True)
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "-v", *FAST_FLAGS],
                     emulator)
    assert result.returncode == 1, result.stderr  # the three refused, listed with reasons
    assert "tag: ImageWidth" not in result.stderr  # -v is the run's detail, not Pillow's
    for name, why in (("hdr float.tif", "32-bit floating-point pixels"),
                      ("hdr int.tif", "32-bit integer pixels"),
                      ("odd layout.tif", "a TIFF this tool cannot decode")):
        assert re.search(rf"rejected +{re.escape(str(src))}/{name}: {why}", result.stdout), \
            result.stdout
    assert emulator.stats["submits"] == 2 == emulator.stats["charged"]
    for body in emulator.state.uploads:
        with Image.open(io.BytesIO(uploaded_image(body))) as sent:
            assert sent.size == grey.size
            difference = ImageStat.Stat(ImageChops.difference(sent.convert("L"), grey))
        assert difference.mean[0] < 2  # the portrait, not a white frame
    assert len([p for p in out.iterdir() if p.is_file()]) == 2
    status = run_cli(["status", "--out", str(out)], None)
    assert status.stdout.count("16-bit grey brought to 8 bits") == 2, status.stdout


def test_progress_totals_count_what_is_really_uploaded_and_saved(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Rejected files and failed tasks are counted on their own: the bars end at 100 % of
    what was really uploaded and saved."""
    import json
    import re

    emulator = make_emulator(faults={"failed_task": 0.4})
    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 6)
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("a text file named like a photo")
    write_portrait(src / "odd" / "x.jpg", seed=99)
    (src / "odd" / ".skinbatch.toml").write_text("[options]\nglow = true\n")
    flags = [f for f in FAST_FLAGS if f != "--no-progress"]
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--progress", *flags],
                     emulator)
    assert result.returncode == 1  # the rejected files and the failed tasks
    counts = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)["counts"]
    failed, saved = counts["failed"], counts["done"]
    assert failed >= 1 and saved + failed == 6
    assert counts["rejected"] == 2 and counts["unreadable_files"] == 1  # the preset's photo
    final = {name: re.findall(rf"{name}\s*:?\s*(\d+)%\|[^|]*\|\s*(\d+)/(\d+)", result.stderr)
             for name in ("uploaded", "saved")}
    assert final["uploaded"] and final["uploaded"][-1] == ("100", "6", "6"), result.stderr
    assert final["saved"] and final["saved"][-1] == ("100", str(saved), str(saved)), \
        result.stderr
    assert f"failed or rejected: {failed}" in result.stderr
    assert "rejected: 3" in result.stderr
    assert f"{saved} done, {failed} failed, 3 rejected, 0 unfinished" in result.stdout
    assert len(list(out.glob("*.jpg"))) == saved


def test_resizing_is_shown_in_status_the_report_and_the_dry_run(
        tmp_path: Path, emulator: Emulator) -> None:
    import csv
    import json

    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 2)
    write_portrait(src / "big.jpg", size=(5200, 3500), seed=9)
    dry = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--dry-run",
                   *FAST_FLAGS], emulator)
    assert "would send as a copy: 1" in dry.stdout, dry.stdout
    assert f"copy {src}/big.jpg: resized from 5200x3500" in dry.stdout, dry.stdout
    assert run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                   emulator).returncode == 0
    status = run_cli(["status", "--out", str(out)], None)
    assert "1 file(s) sent as a prepared copy" in status.stdout, status.stdout
    assert f"{src}/big.jpg: resized from 5200x3500" in status.stdout
    listed = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert [p["path"] for p in listed["prepared_before_upload"]] == [f"{src}/big.jpg"]
    assert run_cli(["report", "--out", str(out), "--format", "csv"], None).returncode == 0
    rows = {r["source"]: r for r in csv.DictReader((out / "skinbatch-report.csv").open())}
    assert "resized from 5200x3500" in rows[f"{src}/big.jpg"]["prepared"]
    assert rows[f"{src}/portrait 0.jpg"]["prepared"] == ""
    assert run_cli(["report", "--out", str(out)], None).returncode == 0
    assert "resized from 5200x3500" in (out / "skinbatch-report.html").read_text()


def test_uploads_start_while_a_big_tree_is_still_being_scanned(
        tmp_path: Path, emulator: Emulator) -> None:
    """The ledger is the queue: the first rows recorded are uploaded while the scan goes on;
    a policy that needs the whole estimate first (on_short_balance = "stop") scans first."""
    import sqlite3

    # Enough files, each large enough for the scan's check to take a few milliseconds, that
    # the scan outlasts the start-up to the first upload several times over on a loaded
    # machine; fewer than the account's 1,000 credits (the second run's policy stops a batch
    # the balance cannot pay). Copies of a few pictures, each made distinct by bytes after
    # its end marker, which decoders ignore.
    src = tmp_path / "shoot"
    pictures = [encode(portrait(1000, 1250, seed=i, grain=8), "JPEG") for i in range(3)]
    for i in range(900):
        folder = src / f"set{i // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.jpg").write_bytes(pictures[i % 3] + i.to_bytes(8, "big"))

    def scan_end_and_first_upload(out: Path) -> tuple[float, float]:
        with sqlite3.connect(out / ".skinbatch" / "ledger.sqlite") as db:
            files, last_recorded = db.execute("SELECT count(*), max(seen_at) FROM files").fetchone()
        assert files == 900
        first = min(t for t, kind in emulator.state.timeline if kind == "submit")
        return last_recorded, first

    out = tmp_path / "out"
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--max-credits", "40",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 1 and emulator.stats["charged"] == 40
    last_recorded, first_upload = scan_end_and_first_upload(out)
    assert first_upload < last_recorded, "the first upload came after the scan's last rows"
    assert "Credits: 900 image(s) to pay for" in result.stderr  # told once the scan ends

    emulator.state.timeline.clear()
    config = tmp_path / "stop.toml"
    config.write_text('on_short_balance = "stop"\n')
    out2 = tmp_path / "out2"
    result = run_cli(["run", str(src), "--out", str(out2), "--config", str(config),
                      "--smart-skin", "--max-credits", "40", *FAST_FLAGS], emulator)
    last_recorded, first_upload = scan_end_and_first_upload(out2)
    assert first_upload > last_recorded, "the whole estimate came first"


def test_a_source_with_no_photos_says_why_and_a_missing_share_is_named(
        tmp_path: Path, emulator: Emulator) -> None:
    """Pointed at a folder of camera RAW files, or at a share's mount point while the share is
    not mounted (an empty folder where earlier runs found photos), a run says so on stderr,
    even with -q (cron mails what it prints), instead of a bare "0 done"; it sends nothing."""
    raw, out = tmp_path / "RAW", tmp_path / "out"
    (raw / "day 1").mkdir(parents=True)
    for i in range(3):
        (raw / "day 1" / f"IMG_{i}.CR2").write_bytes(os.urandom(2000))
    (raw / "shot list.txt").write_text("Anna, Ben")
    result = run_cli(["run", str(raw), "--out", str(out), "--smart-skin", "-q", *FAST_FLAGS],
                     emulator)
    assert result.returncode == 0, result.stderr
    assert f"No photos in {raw}" in result.stderr
    assert "(.cr2 3, .txt 1)" in result.stderr
    assert "export them as JPEG or TIFF" in result.stderr
    assert "mounted" not in result.stderr
    dry = run_cli(["run", str(raw), "--out", str(out), "--dry-run", "--smart-skin",
                   *FAST_FLAGS], emulator)
    assert f"No photos in {raw}" in dry.stdout + dry.stderr
    assert emulator.stats.get("submits", 0) == 0

    share, out = tmp_path / "nas", tmp_path / "out2"
    shoot(share, 2)
    first = run_cli(["run", str(share), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                    emulator)
    assert first.returncode == 0 and "No photos" not in first.stderr
    for photo in share.iterdir():  # the share is not mounted: its mount point is empty
        photo.unlink()
    result = run_cli(["run", str(share), "--out", str(out), "--smart-skin", "-q",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert f"No photos in {share}: the folder is empty." in result.stderr
    assert "is it mounted?" in result.stderr
    assert emulator.stats["submits"] == 2


def test_a_folder_this_user_cannot_read_is_named_not_skipped_in_silence(
        tmp_path: Path, emulator: Emulator) -> None:
    """A session copied in by another user (its folder mode 700): its photos were left out
    without a word, exit 0, and never retouched. The folder is named with why, in the
    summary, with -q, in the dry run, in status and in the morning report, exit 1; once it
    can be read, its photos are sent and it is no longer listed."""
    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 1)
    write_portrait(src / "second shooter" / "b.jpg", seed=9)
    locked = src / "second shooter"
    locked.chmod(0)
    words = (f"{locked}: cannot be read (Permission denied); its photos are left out until it "
             "can be")
    try:
        args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
        dry = run_cli([*args, "--dry-run"], emulator, as_plain_user=True)
        assert words in dry.stdout + dry.stderr, dry.stdout + dry.stderr
        first = run_cli(args, emulator, as_plain_user=True)
        assert first.returncode == 1, first.stderr
        assert re.search(rf"^  unreadable {re.escape(words)}$", first.stdout, re.M), first.stdout
        quiet = run_cli([*args, "-q"], emulator, as_plain_user=True)
        assert quiet.returncode == 1 and words in quiet.stderr, quiet.stderr
    finally:
        locked.chmod(0o755)
    status = run_cli(["status", "--out", str(out)], None)
    assert re.search(rf"^  unreadable {re.escape(words)}$", status.stdout, re.M), status.stdout
    assert run_cli(["report", "--out", str(out), "--format", "json"], None).returncode == 0
    report = json.loads((out / "skinbatch-report.json").read_text())
    assert {"source": str(locked), "why": words.partition(": ")[2]} in \
        report["needs_attention"], report["needs_attention"]
    assert emulator.stats["charged"] == 1
    again = run_cli(args, emulator, as_plain_user=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (out / "second shooter" / "b.jpg").is_file() and emulator.stats["charged"] == 2
    assert "unreadable" not in run_cli(["status", "--out", str(out)], None).stdout


def test_a_nas_shares_system_folders_are_not_the_shoot(tmp_path: Path,
                                                     emulator: Emulator) -> None:
    """A Synology share keeps several JPEG previews of each photo in @eaDir beside it, its
    culled photos in #recycle and copies of the shoot in #snapshot; a QNAP, a drive used on
    Windows and an ext4 drive's top have theirs. Each photo in them was paid for, and
    lost+found (root's alone) was listed as unreadable, exit 1, every night. Only the shoot
    is sent now; such a folder given as a SOURCE of its own is sent."""
    share, out = tmp_path / "share", tmp_path / "out"
    write_portrait(share / "shoot" / "IMG_1.jpg", seed=1)
    system = ["shoot/@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_XL.jpg",
              "shoot/@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_M.jpg", "#recycle/culled.jpg",
              "#snapshot/GMT+01_2026-12-01-03h00m/shoot/IMG_0.jpg", "@Recycle/old.jpg",
              "@Recently-Snapshot/GMT+01_2026-12-01/shoot/IMG_0.jpg",
              "$RECYCLE.BIN/S-1-5-21-1000/$RA1B2C3.jpg", "System Volume Information/tmp.jpg",
              "lost+found/#131074.jpg"]
    for seed, rel in enumerate(system, start=2):
        write_portrait(share / rel, seed=seed)
    (share / "lost+found").chmod(0o700)
    (share / "lost+found" / "#131074.jpg").chmod(0)
    (share / "lost+found").chmod(0)
    try:
        result = run_cli(["run", str(share), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                         emulator, as_plain_user=True)
    finally:
        (share / "lost+found").chmod(0o700)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unreadable" not in result.stdout + result.stderr
    assert emulator.stats["charged"] == 1
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")
                  if ".skinbatch" not in p.parts) == ["shoot/IMG_1.jpg"]
    given = run_cli(["run", str(share / "#recycle"), "--out", str(tmp_path / "restored"),
                     "--smart-skin", *FAST_FLAGS], emulator)
    assert given.returncode == 0, given.stdout + given.stderr
    assert (tmp_path / "restored" / "culled.jpg").is_file() and emulator.stats["charged"] == 2


def test_the_bundled_emulators_imitations_never_mix_with_the_apis_results(
        tmp_path: Path, emulator: Emulator) -> None:
    """The README's first command (--emulator) and then the same command with a key: the
    ledger says the photos are done, and the output folder holds the emulator's imitation
    retouches. Refused at start (exit 2, nothing sent) with the way out; the other way round
    too (the emulator's imitations would land among the API's results)."""
    src, tried = tmp_path / "shoot", tmp_path / "tried"
    shoot(src, 2)
    demo = run_cli(["run", str(src), "--out", str(tried), "--emulator", "--smart-skin",
                    "--no-progress", "--poll-interval", "0.2"], None, key=None)
    assert demo.returncode == 0, demo.stderr
    imitations = {p.name: p.read_bytes() for p in tried.glob("*.jpg")}
    assert len(imitations) == 2
    result = run_cli(["run", str(src), "--out", str(tried), "--smart-skin", *FAST_FLAGS],
                     emulator)
    assert_refused(result, emulator, "imitation")
    assert f"use another --out for the API (or delete {tried} to start again)" in result.stderr
    assert {p.name: p.read_bytes() for p in tried.glob("*.jpg")} == imitations
    dry = run_cli(["run", str(src), "--out", str(tried), "--dry-run", "--smart-skin",
                   *FAST_FLAGS], emulator)
    assert dry.returncode == 2 and "imitation" in dry.stderr
    again = run_cli(["run", str(src), "--out", str(tried), "--emulator", "--smart-skin",
                     "--no-progress", "--poll-interval", "0.2"], None, key=None)
    assert again.returncode == 0, again.stderr  # the emulator's own folder stays its own
    assert run_cli(["report", "--out", str(tried)], None).returncode == 0
    page = html.unescape((tried / "skinbatch-report.html").read_text())
    for shown in (run_cli(["status", "--out", str(tried)], None).stdout, page):
        assert ("These results are imitation retouches of the bundled emulator (runs with "
                "--emulator, or with its key), not the API's") in shown

    real = tmp_path / "retouched"
    assert run_cli(["run", str(src), "--out", str(real), "--smart-skin", *FAST_FLAGS],
                   emulator).returncode == 0
    assert emulator.stats["submits"] == 2
    results = {p.name: p.read_bytes() for p in real.glob("*.jpg")}
    write_portrait(src / "new one.jpg", seed=7)
    mixed = run_cli(["run", str(src), "--out", str(real), "--emulator", "--smart-skin",
                     "--no-progress", "--poll-interval", "0.2"], None, key=None)
    assert mixed.returncode == 2, mixed.stderr
    assert "holds the API's results" in mixed.stderr
    assert {p.name: p.read_bytes() for p in real.glob("*.jpg")} == results
    assert "imitation" not in run_cli(["status", "--out", str(real)], None).stdout
    own = ["--ledger", str(tmp_path / "own.sqlite")]  # a ledger of its own is named by the flag
    assert run_cli(["run", str(src), "--out", str(tmp_path / "o3"), *own, "--emulator",
                    "--smart-skin", "--no-progress", "--poll-interval", "0.2", "--pay-again"],
                   None, key=None).returncode == 0
    result = run_cli(["run", str(src), "--out", str(tmp_path / "o4"), *own, "--smart-skin",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 2
    assert "the ledger given by --ledger holds the bundled emulator's imitation" in \
        result.stderr and "use another --ledger for the API" in result.stderr
    assert emulator.stats["submits"] == 2  # only the run on the API's own folder sent


def test_a_run_on_the_emulator_by_its_key_keeps_its_imitations_apart(
        tmp_path: Path, emulator: Emulator) -> None:
    """`skinbatch emulate` says how a run reaches it: AILAB_API_BASE and its key. Photos tried
    so are imitation retouches, as with --emulator: the shoot run on the API into that folder
    is refused, and into another it is sent and paid, not given the imitations (copied from
    the folder tried) as its results."""
    src, tried, real = tmp_path / "shoot", tmp_path / "tried", tmp_path / "retouched"
    shoot(src, 2)
    served = subprocess.Popen([sys.executable, "-m", "batch", "emulate", "--port", "0",
                               "--result-port", "0", "--queue-seconds", "0.05",
                               "--process-seconds", "0.05"], stdout=subprocess.PIPE, text=True,
                              env=cli_env(None, None))
    try:
        assert served.stdout is not None
        said = served.stdout.readline()
        use = dict(word.split("=", 1) for word in said.split("Use: ", 1)[1].split()
                   if "=" in word)
        tried_run = run_cli(["run", str(src), "--out", str(tried), "--smart-skin", *FAST_FLAGS],
                            None, key=use["AILAB_API_KEY"],
                            extra_env={"AILAB_API_BASE": use["AILAB_API_BASE"]})
    finally:
        served.terminate()
        served.wait(timeout=30)
    assert tried_run.returncode == 0, tried_run.stderr
    assert "imitation retouches of the bundled emulator" in run_cli(
        ["status", "--out", str(tried)], None).stdout
    result = run_cli(["run", str(src), "--out", str(tried), "--smart-skin", *FAST_FLAGS],
                     emulator)
    assert_refused(result, emulator, "imitation")
    api = run_cli(["run", str(src), "--out", str(real), "--smart-skin", *FAST_FLAGS], emulator)
    assert api.returncode == 0, api.stderr
    assert emulator.stats["charged"] == 2, api.stderr  # not copied from the imitations
    assert "imitation" not in run_cli(["status", "--out", str(real)], None).stdout


def test_photos_retouched_before_into_another_out_are_copied_not_paid_for_again(
        tmp_path: Path, emulator: Emulator) -> None:
    """Yesterday's results went to one folder; today the same shoot is run with its --out on
    an external drive (a new ledger there): the photos retouched before are not paid for
    again, their results are copied from the first folder, and the dry run and the run's
    estimate count only the new photo. A result gone from there (moved away) is not bought
    again unasked: that photo is listed with why; --pay-again buys it, as asked."""
    src, first, second = tmp_path / "shoot", tmp_path / "retouched", tmp_path / "drive"
    shoot(src, 3)
    assert run_cli(["run", str(src), "--out", str(first), "--smart-skin", *FAST_FLAGS],
                   emulator).returncode == 0
    write_portrait(src / "new one.jpg", seed=9)
    args = ["run", str(src), "--out", str(second), "--smart-skin", *FAST_FLAGS]
    dry = run_cli([*args, "--dry-run"], emulator)
    assert "would send:   1 image(s)" in dry.stdout and "would reject: 0" in dry.stdout
    assert "retouched before into other output folders, their results copied from there " \
        "(not paid for again): 3" in dry.stdout, dry.stdout
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert "1 image(s) to pay for" in again.stderr, again.stderr
    assert "3 photo(s) were retouched before into another output folder" in again.stderr
    assert emulator.stats["charged"] == 3 + 1
    assert outputs(second) == ["new one.jpg", *(f"portrait {i}.jpg" for i in range(3))]
    for i in range(3):
        assert (second / f"portrait {i}.jpg").read_bytes() == \
            (first / f"portrait {i}.jpg").read_bytes()
    status = run_cli(["status", "--out", str(second), "--json"], None)
    assert json.loads(status.stdout)["counts"]["done"] == 4, status.stdout

    # A third folder: one result moved away from both folders, one edited by hand in the first
    # (the second's copy is still the result, and is the one copied).
    (first / "portrait 0.jpg").rename(tmp_path / "delivered.jpg")
    (second / "portrait 0.jpg").unlink()
    (first / "portrait 1.jpg").write_bytes(b"edited by hand")
    third = ["run", str(src), "--out", str(tmp_path / "third"), "--smart-skin", *FAST_FLAGS]
    held = run_cli(third, emulator)
    assert held.returncode == 1, held.stderr
    assert emulator.stats["charged"] == 4
    assert outputs(tmp_path / "third") == ["new one.jpg", "portrait 1.jpg", "portrait 2.jpg"]
    assert (tmp_path / "third" / "portrait 1.jpg").read_bytes() == \
        (second / "portrait 1.jpg").read_bytes()
    status_text = run_cli(["status", "--out", str(tmp_path / "third")], None).stdout
    assert "portrait 0.jpg" in status_text and "but its result is no longer there (moved or " \
        "deleted): not paid for again (--pay-again buys it again)" in status_text, status_text
    dry = run_cli([*third, "--pay-again", "--dry-run"], emulator)  # says what the run does
    assert "would send:   1 image(s)" in dry.stdout and "would reject: 0" in dry.stdout, dry.stdout
    paid = run_cli([*third, "--pay-again"], emulator)
    assert paid.returncode == 0, paid.stderr
    assert emulator.stats["charged"] == 4 + 1
    assert outputs(tmp_path / "third") == [
        "new one.jpg", *(f"portrait {i}.jpg" for i in range(3))]


def test_an_output_folder_whose_name_is_not_utf8_is_remembered_and_copied_from(
        tmp_path: Path, emulator: Emulator) -> None:
    """An --out named in another system's encoding (a Latin-1 name on an old share): the run
    and the next one into another folder work as with any name, the photo copied from the
    first, not paid again, and the name is printed as status shows such names. (The list of
    ledgers could not be written, or read back into a ledger, with such a name, nor the
    name printed on a UTF-8 terminal: each run stopped on a traceback.)"""
    src = tmp_path / "shoot"
    shoot(src, 1)
    first = tmp_path / os.fsdecode(b"retouched-M\xfcller")
    # Strict, as a desktop's UTF-8 locale makes the terminal: the name is printed escaped.
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    result = run_cli(["run", str(src), "--out", str(first), "--smart-skin", *FAST_FLAGS],
                     emulator, extra_env=strict)
    assert result.returncode == 0, result.stderr
    assert "Results are in " + str(tmp_path / "retouched-M\\xfcller.") in result.stdout
    report = run_cli(["report", "--out", str(first)], None, extra_env=strict)
    assert report.returncode == 0, report.stderr
    assert "retouched-M\\xfcller" in (first / "skinbatch-report.html").read_text()
    second = tmp_path / "drive"
    again = run_cli(["run", str(src), "--out", str(second), "--smart-skin", *FAST_FLAGS],
                    emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats["charged"] == 1
    assert (second / "portrait 0.jpg").read_bytes() == (first / "portrait 0.jpg").read_bytes()


def test_photos_left_waiting_are_copied_once_another_folder_has_retouched_them(
        tmp_path: Path, emulator: Emulator) -> None:
    """A run capped by --max-credits leaves photos waiting in its folder's ledger; the same
    shoot is then run into another folder, which retouches them. The first folder's next run
    copies their results from there rather than sending them."""
    src, capped, full = tmp_path / "shoot", tmp_path / "capped", tmp_path / "full"
    shoot(src, 3)
    args = ["run", str(src), "--out", str(capped), "--smart-skin", *FAST_FLAGS]
    assert run_cli([*args, "--max-credits", "1"], emulator).returncode == 1
    assert emulator.stats["charged"] == 1
    done = run_cli(["run", str(src), "--out", str(full), "--smart-skin", *FAST_FLAGS], emulator)
    assert done.returncode == 0, done.stderr
    assert emulator.stats["charged"] == 3  # the capped run's photo is copied from there
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats["charged"] == 3
    assert outputs(capped) == [f"portrait {i}.jpg" for i in range(3)]
    assert "2 photo(s) were retouched before into another output folder" in again.stderr


def test_a_run_with_every_option_off_says_so_before_anything_is_sent(
        tmp_path: Path, emulator: Emulator) -> None:
    """Every retouching option is off unless turned on, as in the API, which takes such a
    request and charges for it: a forgotten --smart-skin is said before the first upload (and
    by the dry run), even with -q. A folder preset that turns one on still applies there."""
    src, out = tmp_path / "shoot", tmp_path / "out"
    shoot(src, 2)
    write_portrait(src / "acne" / "close-up.jpg", seed=5)
    (src / "acne" / ".skinbatch.toml").write_text("[options]\nacne_removal = true\n")
    dry = run_cli(["run", str(src), "--out", str(out), "--dry-run", *FAST_FLAGS], emulator)
    assert "No retouching option is on (--smart-skin, --acne-removal," in dry.stdout
    result = run_cli(["run", str(src), "--out", str(out), "-q", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    warning = result.stderr.index("No retouching option is on")
    assert "each photo is sent with all nine off, the API's defaults, and charged" in \
        result.stderr[warning:]
    assert outputs(out) == ["acne/close-up.jpg", "portrait 0.jpg", "portrait 1.jpg"]
    assert sorted(sorted(t.enabled) for t in emulator.state.tasks.values()) == [
        [], [], ["acne_removal"]]
    # The two results made with every option off are the photos untouched: sent again. The
    # close-up's had acne removal: held until --pay-again, as any result under other options.
    again = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "-q", *FAST_FLAGS],
                    emulator)
    assert again.returncode == 1 and "No retouching option" not in again.stderr
    assert "1 photo(s) were retouched before under other options" in again.stderr
    assert sorted(sorted(t.enabled) for t in emulator.state.tasks.values()) == [
        [], [], ["acne_removal"], ["smart_skin"], ["smart_skin"]]


def test_a_link_to_a_folder_in_a_source_is_said_not_passed_over(tmp_path: Path,
                                                               emulator: Emulator) -> None:
    """A studio links a client's folder from the archive into tonight's folder: it is not
    followed (a link can reach a whole archive, each photo paid for), and the run says so
    and how to send it, once; a link to a folder inside the source is scanned in its place.
    A source holding nothing but such a link says where its photos are, not "empty"."""
    tonight, archive = tmp_path / "tonight", tmp_path / "archive" / "client-b"
    shoot(tonight / "client-a", 1)
    shoot(archive, 3)
    (tonight / "client-b").symlink_to(archive, target_is_directory=True)
    (tonight / "latest").symlink_to(tonight / "client-a", target_is_directory=True)
    args = ["run", str(tonight), "--out", str(tmp_path / "out"), "--smart-skin", *FAST_FLAGS]
    words = (f"Left out {tonight / 'client-b'}: it is a link to the folder {archive}, and "
             "links to folders are not followed")
    dry = run_cli([*args, "--dry-run"], emulator)
    assert "would send:   1 image(s)" in dry.stdout and words in dry.stdout, dry.stdout
    result = run_cli([*args, "-q"], emulator)
    assert result.returncode == 0, result.stderr
    assert words in result.stderr and f"give {archive} as a SOURCE" in result.stderr
    assert "latest" not in result.stderr
    assert emulator.stats["charged"] == 1
    assert outputs(tmp_path / "out") == ["client-a/portrait 0.jpg"]
    nightly = run_cli([*args, "-q"], emulator)
    assert nightly.returncode == 0 and nightly.stdout + nightly.stderr == "", nightly.stderr
    only_link = tmp_path / "only-link"
    only_link.mkdir()
    (only_link / "client-b").symlink_to(archive, target_is_directory=True)
    alone = run_cli(["run", str(only_link), "--out", str(tmp_path / "out2"), "--smart-skin",
                     "-q", *FAST_FLAGS], emulator)
    assert (f"No photos in {only_link} but in the folders left out (said above): "
            f"{only_link / 'client-b'}.") in alone.stderr, alone.stderr
    assert "the folder is empty" not in alone.stderr and emulator.stats["charged"] == 1


def test_an_earlier_runs_results_inside_a_source_are_left_out(tmp_path: Path,
                                                              emulator: Emulator) -> None:
    """A month later someone points a run at the parent of a session and of its results
    folder: the results are retouched already, and sending them would pay for each photo
    twice. A folder holding a run's state folder is left out, and said to be."""
    shoots = tmp_path / "shoots"
    shoot(shoots / "session", 3)
    first = run_cli(["run", str(shoots / "session"), "--out", str(shoots / "session-retouched"),
                     "--smart-skin", *FAST_FLAGS], emulator)
    assert first.returncode == 0, first.stderr
    assert emulator.stats["charged"] == 3
    args = ["run", str(shoots), "--out", str(tmp_path / "all"), "--smart-skin", *FAST_FLAGS,
            "--pay-again"]  # the session's photos themselves: sent again, as asked
    dry = run_cli([*args, "--dry-run"], emulator)
    assert "would send:   3 image(s)" in dry.stdout, dry.stdout
    words = f"Left out {shoots / 'session-retouched'}: it holds an earlier run's results"
    assert words in dry.stdout
    result = run_cli([*args, "-q"], emulator)
    assert result.returncode == 0, result.stderr
    assert words in result.stderr
    assert emulator.stats["charged"] == 3 + 3  # not 3 + 6
    assert outputs(tmp_path / "all") == [f"session/portrait {i}.jpg" for i in range(3)]
    nightly = run_cli([*args, "-q"], emulator)  # told once: a cron job's clean night is quiet
    assert nightly.returncode == 0 and nightly.stdout + nightly.stderr == "", nightly.stderr
