from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from batch.ledger import open_ledger
from batch.ledger.store import KnownFile
from batch.options import Options
from batch.scan import SourceRoot, read_file, scan
from batch.states import JobState
from tests.imagegen import write_portrait

FP = Options.of(["smart_skin"])


def test_scan_finds_images_recursively_and_skips_hidden_temp_and_other_files(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_portrait(src / "a.JPG")
    write_portrait(src / "sub dir/b.png", "PNG", seed=1)
    write_portrait(src / "sub dir/deeper/c.WebP", "WEBP", seed=2)
    write_portrait(src / ".hidden.jpg", seed=3)
    write_portrait(src / ".cache/d.jpg", seed=4)
    write_portrait(src / "e.jpg.part", seed=5)
    write_portrait(src / "f.tmp", seed=6)
    write_portrait(src / "g.jpg~", seed=7)
    (src / "notes.txt").write_text("hello")
    ledger = open_ledger(tmp_path / "l.sqlite")
    stats = scan(ledger, [SourceRoot(src)], FP)
    assert stats.found == 3 and stats.hashed == 3 and stats.new_jobs == 3
    assert ledger.file_count() == 3


def test_rescan_of_an_unchanged_tree_reads_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5):
        write_portrait(src / f"{i}.jpg", seed=i)
    ledger = open_ledger(tmp_path / "l.sqlite")
    scan(ledger, [SourceRoot(src)], FP)
    again = scan(ledger, [SourceRoot(src)], FP)
    assert (again.found, again.hashed, again.unchanged, again.new_jobs) == (5, 0, 5, 0)
    write_portrait(src / "3.jpg", seed=99)
    os.utime(src / "3.jpg", ns=(1, 1))
    changed = scan(ledger, [SourceRoot(src)], FP)
    assert (changed.hashed, changed.new_jobs) == (1, 1)


def test_rename_and_copy_do_not_make_new_jobs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_portrait(src / "a.jpg")
    ledger = open_ledger(tmp_path / "l.sqlite")
    scan(ledger, [SourceRoot(src)], FP)
    (src / "a.jpg").rename(src / "renamed.jpg")
    (src / "copy.jpg").write_bytes((src / "renamed.jpg").read_bytes())
    stats = scan(ledger, [SourceRoot(src)], FP)
    assert stats.new_jobs == 0
    assert ledger.counts()["pending"] == 1


def test_symlinks_out_of_the_source_are_not_followed(tmp_path: Path) -> None:
    src, outside = tmp_path / "src", tmp_path / "outside"
    write_portrait(outside / "secret.jpg")
    write_portrait(src / "inside.jpg", seed=1)
    (src / "link-out.jpg").symlink_to(outside / "secret.jpg")
    (src / "link-in.jpg").symlink_to(src / "inside.jpg")
    (src / "dir-link").symlink_to(outside, target_is_directory=True)
    (src / "loop.jpg").symlink_to(src / "loop.jpg")
    ledger = open_ledger(tmp_path / "l.sqlite")
    scan(ledger, [SourceRoot(src)], FP)
    reasons = {Path(p.path).name: p.reason for p in ledger.problems()}
    assert "outside the source" in reasons["link-out.jpg"]
    assert "looping" in reasons["loop.jpg"]
    assert "secret.jpg" not in reasons and ledger.counts()["pending"] == 1


def test_rescan_skips_unchanged_folders_and_looks_into_changed_ones(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for folder in ("a", "b"):
        for i in range(3):
            write_portrait(src / folder / f"{i}.jpg", seed=i * 10 + ord(folder))
    ledger = open_ledger(tmp_path / "l.sqlite")
    assert scan(ledger, [SourceRoot(src)], FP).hashed == 6
    before = ledger.known_files(str(src.resolve()), "a")["a/0.jpg"].content_sha256
    # Same size and mtime, other bytes: a stat-only re-scan must not read it (the ledger keeps
    # the old hash), which proves the unchanged folder was skipped.
    target = src / "a" / "0.jpg"
    st = target.stat()
    target.write_bytes(bytes(reversed(target.read_bytes())))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = scan(ledger, [SourceRoot(src)], FP)
    assert (again.found, again.hashed, again.unchanged) == (6, 0, 6)
    assert ledger.known_files(str(src.resolve()), "a")["a/0.jpg"].content_sha256 == before
    write_portrait(src / "b" / "new.jpg", seed=50)
    grown = scan(ledger, [SourceRoot(src)], FP)
    assert (grown.found, grown.hashed, grown.unchanged, grown.new_jobs) == (7, 1, 6, 1)
    # Other options: every folder is looked into again and its files re-linked (not re-read).
    other = scan(ledger, [SourceRoot(src)], Options.of(["acne_removal"]))
    assert (other.hashed, other.new_jobs) == (0, 7)


def test_a_folder_with_a_file_still_settling_is_looked_into_again(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_portrait(src / "incoming" / "fresh.jpg")
    ledger = open_ledger(tmp_path / "l.sqlite")
    first = scan(ledger, [SourceRoot(src)], FP, settle=0.5)
    assert (first.deferred, first.hashed) == (1, 0)
    time.sleep(0.6)
    # Same names, sizes and mtimes as before: only a folder never marked complete is re-read.
    later = scan(ledger, [SourceRoot(src)], FP, settle=0.5)
    assert (later.deferred, later.hashed, later.new_jobs) == (0, 1, 1)


def test_many_files_over_several_batches_are_hashed_correctly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = {}
    for i in range(2100):
        data = os.urandom(100 + i % 500)
        (src / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 2}" / f"{i}.jpg").write_bytes(data)
        expected[f"d{i % 2}/{i}.jpg"] = hashlib.sha256(data).hexdigest()
    (src / "d0" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    ledger = open_ledger(tmp_path / "l.sqlite")
    stats = scan(ledger, [SourceRoot(src)], FP)
    assert (stats.found, stats.hashed, stats.problems) == (2101, 2100, 1)
    root = str(src.resolve())
    known = {**ledger.known_files(root, "d0"), **ledger.known_files(root, "d1")}
    assert {rel: k.content_sha256 for rel, k in known.items() if k.problem is None} == expected
    assert known["d0/gone.jpg"].problem == "broken or looping symbolic link"


def test_scans_and_folder_digests_on_both_ledger_backends(ledger_location: str,
                                                          tmp_path: Path) -> None:
    """The scan's paths (batched inserts, per-folder lookups, digests) on both
    ledger back-ends, with folder names that need escaping in a LIKE pattern."""
    src = tmp_path / "src"
    for n, folder in enumerate(("100%_done", "a_b", "a_b/deeper")):
        for i in range(3):
            write_portrait(src / folder / f"{i}.jpg", seed=10 * n + i)
    write_portrait(src / "top.jpg", seed=99)
    ledger = open_ledger(ledger_location)
    try:
        first = scan(ledger, [SourceRoot(src)], FP)
        assert (first.found, first.hashed, first.new_jobs) == (10, 10, 10)
        again = scan(ledger, [SourceRoot(src)], FP)
        assert (again.found, again.hashed, again.unchanged) == (10, 0, 10)
        write_portrait(src / "a_b" / "new.jpg", seed=500)
        grown = scan(ledger, [SourceRoot(src)], FP)
        assert (grown.found, grown.hashed, grown.unchanged, grown.new_jobs) == (11, 1, 10, 1)
        root = str(src.resolve())
        assert sorted(ledger.known_files(root, "a_b")) == [
            "a_b/0.jpg", "a_b/1.jpg", "a_b/2.jpg", "a_b/new.jpg"]
        assert sorted(ledger.known_files(root, "")) == ["top.jpg"]
    finally:
        ledger.close()


def test_a_first_scan_leaves_digests_that_let_the_rescan_skip_every_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest a first scan saves must be the one a re-scan computes from its own look
    at the folder, or every re-scan would fall back to per-file lookups."""
    src = tmp_path / "src"
    for i in range(2100):  # more than two batches in one folder
        (src / "many").mkdir(parents=True, exist_ok=True)
        (src / "many" / f"{i}.jpg").write_bytes(os.urandom(200 + i))
    write_portrait(src / "few" / "a.jpg")
    write_portrait(src / "few" / "deeper" / "b.png", "PNG", seed=1)
    (src / "few" / "a.CR2").write_bytes(b"raw next to the jpeg")
    ledger = open_ledger(tmp_path / "l.sqlite")
    first = scan(ledger, [SourceRoot(src)], FP)
    assert (first.found, first.hashed, first.problems) == (2102, 2102, 0)
    root = str(src.resolve())
    for rel in ("many/7.jpg", "few/a.jpg"):
        recorded, st = ledger.known_files(root, rel.rpartition("/")[0])[rel], (src / rel).stat()
        assert (recorded.size_bytes, recorded.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert set(ledger.folder_digests(root)) == {"many", "few", "few/deeper"}

    lookups: list[str] = []
    real = ledger.known_files

    def counted(base: str, rel_dir: str) -> dict[str, KnownFile]:
        lookups.append(rel_dir)
        return real(base, rel_dir)

    monkeypatch.setattr(ledger, "known_files", counted)
    again = scan(ledger, [SourceRoot(src)], FP)
    assert (again.found, again.hashed, again.unchanged) == (2102, 0, 2102)
    assert lookups == []


def test_a_new_folder_with_a_symlink_or_a_problem_gets_no_digest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_portrait(src / "linked" / "a.jpg")
    (src / "linked" / "b.jpg").symlink_to(src / "linked" / "a.jpg")
    write_portrait(src / "odd" / "a.jpg", seed=1)
    os.mkfifo(src / "odd" / "pipe.jpg")
    write_portrait(src / "plain" / "a.jpg", seed=2)
    ledger = open_ledger(tmp_path / "l.sqlite")
    stats = scan(ledger, [SourceRoot(src)], FP)
    assert (stats.found, stats.problems) == (5, 1)
    assert {p.reason for p in ledger.problems()} == {"not a regular file"}
    assert set(ledger.folder_digests(str(src.resolve()))) == {"plain"}


def test_the_reader_reports_a_fifo_or_a_vanished_file_instead_of_waiting(
        tmp_path: Path) -> None:
    """Between the walk and the read a photo may be replaced by a FIFO or deleted: the reader
    must not block in open() nor raise."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "real.jpg").write_bytes(b"12345")
    assert read_file(str(tmp_path / "pipe.jpg"))[:4] == (None, "not a regular file", 0, 0)
    assert read_file(str(tmp_path / "gone.jpg"))[:2] == (
        None, "the file disappeared while it was being scanned")
    st = (tmp_path / "real.jpg").stat()
    assert read_file(str(tmp_path / "real.jpg"))[:4] == (
        hashlib.sha256(b"12345").hexdigest(), None, 5, st.st_mtime_ns)
    # asked for preflight's verdict too, the same read gives it
    from batch.preflight import PrepareSettings

    judged = read_file(str(tmp_path / "real.jpg"), PrepareSettings())
    assert judged[:4] == (hashlib.sha256(b"12345").hexdigest(), None, 5, st.st_mtime_ns)
    assert judged.rejected is not None and "not an image" in judged.rejected


@pytest.mark.parametrize("files", [40, 2100], ids=["one-batch", "several-batches"])
def test_a_new_folder_gets_its_output_names_and_reasons(tmp_path: Path, files: int) -> None:
    """The rows of a new folder carry the preset's naming, the source's output prefix, a
    line-break name's reason, and a digest the re-scan agrees with."""
    src = tmp_path / "src"
    named = src / "named"
    named.mkdir(parents=True)
    (named / ".skinbatch.toml").write_text('naming = "{stem}_retouched{ext}"\n')
    expected = {}
    for i in range(files):
        data = os.urandom(64 + i)
        (named / f"{i}.jpg").write_bytes(data)
        expected[f"named/{i}.jpg"] = hashlib.sha256(data).hexdigest()
    (named / "notes.txt").write_text("not a photo, but part of the folder's digest")
    write_portrait(src / "odd" / "fine.jpg")
    (src / "odd" / "line\nbreak.jpg").write_bytes(b"never read")
    ledger = open_ledger(tmp_path / "l.sqlite")
    first = scan(ledger, [SourceRoot(src, out_prefix="shoot")], FP)
    assert (first.found, first.hashed, first.problems) == (files + 2, files + 1, 1)
    root = str(src.resolve())
    known = ledger.known_files(root, "named")
    assert {rel: k.content_sha256 for rel, k in known.items()} == expected
    assert known["named/7.jpg"].out_rel == "shoot/named/7_retouched.jpg"
    odd = ledger.known_files(root, "odd")
    assert odd["odd/fine.jpg"].out_rel == "shoot/odd/fine.jpg"
    assert odd["odd/line\nbreak.jpg"].problem == "the file name contains a line break; " \
        "rename it to process it"
    assert odd["odd/line\nbreak.jpg"].content_sha256 is None
    assert set(ledger.folder_digests(root)) == {"named"}
    again = scan(ledger, [SourceRoot(src, out_prefix="shoot")], FP)
    assert (again.found, again.hashed, again.unchanged, again.problems) == (
        files + 2, 0, files + 1, 1)


def test_a_first_scan_recorded_over_many_transactions_links_every_file_to_its_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small batches, so that rows are recorded while later files are still being hashed,
    and duplicates span batches: every file must end up recorded once, linked to the one job
    of its content."""
    import batch.scan

    monkeypatch.setattr(batch.scan, "BATCH", 64)
    src = tmp_path / "src"
    contents = [os.urandom(100 + i) for i in range(500)]
    expected = {}
    for i in range(1200):
        folder = src / f"f{i % 30:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = contents[i % len(contents)]
        (folder / f"{i}.jpg").write_bytes(data)
        expected[f"f{i % 30:02d}/{i}.jpg"] = hashlib.sha256(data).hexdigest()
    ledger = open_ledger(tmp_path / "l.sqlite")
    stats = scan(ledger, [SourceRoot(src)], FP)
    assert (stats.found, stats.hashed, stats.new_jobs) == (1200, 1200, 500)
    assert ledger.counts()["pending"] == 500 and ledger.file_count() == 1200
    root = str(src.resolve())
    recorded = {}
    for n in range(30):
        recorded.update(ledger.known_files(root, f"f{n:02d}"))
    assert {rel: k.content_sha256 for rel, k in recorded.items()} == expected
    jobs_of = {k.content_sha256: k.job_id for k in recorded.values()}
    assert all(k.job_id == jobs_of[k.content_sha256] for k in recorded.values())
    assert len(set(jobs_of.values())) == 500
    assert len(ledger.folder_digests(root)) == 30


def test_a_big_folder_recorded_over_several_batches_still_gets_its_digest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One folder holding a whole shoot spans several batches; its digest must be the one
    the re-scan computes, and a file that cannot be taken must leave its folder without
    one."""
    import batch.scan

    monkeypatch.setattr(batch.scan, "BATCH", 64)
    src = tmp_path / "src"
    (src / "shoot").mkdir(parents=True)
    (src / "spoiled").mkdir()
    expected = {}
    for i in range(300):
        data = os.urandom(50 + i)
        (src / "shoot" / f"{i:03d}.jpg").write_bytes(data)
        (src / "spoiled" / f"{i:03d}.jpg").write_bytes(data)
        expected[f"shoot/{i:03d}.jpg"] = hashlib.sha256(data).hexdigest()
    (src / "shoot" / "contact-sheet.pdf").write_bytes(b"%PDF")
    (src / "spoiled" / "line\nbreak.jpg").write_bytes(b"never read")
    ledger = open_ledger(tmp_path / "l.sqlite")
    first = scan(ledger, [SourceRoot(src)], FP)
    root = str(src.resolve())
    assert (first.found, first.hashed, first.problems) == (601, 600, 1)
    known = ledger.known_files(root, "shoot")
    assert {rel: k.content_sha256 for rel, k in known.items()} == expected
    digests = ledger.folder_digests(root)
    assert digests["shoot"][1] == 300
    assert "spoiled" not in digests

    lookups: list[str] = []
    real = ledger.known_files

    def counted(base: str, rel_dir: str) -> dict[str, KnownFile]:
        lookups.append(rel_dir)
        return real(base, rel_dir)

    monkeypatch.setattr(ledger, "known_files", counted)
    again = scan(ledger, [SourceRoot(src)], FP)
    assert (again.found, again.hashed) == (601, 0)
    assert lookups == ["spoiled"]


def test_files_gone_from_their_folder_are_forgotten_unless_a_paid_result_awaits_them(
        ledger_location: str, tmp_path: Path) -> None:
    """Culled photos leave the ledger with the next scan of their folder, on both back-ends:
    they are not sent; a photo whose paid result is not saved yet is kept, so that the result
    is still saved."""
    src = tmp_path / "src"
    for seed, name in enumerate(("culled.jpg", "in-flight.jpg", "kept.jpg")):
        write_portrait(src / "shoot" / name, seed=seed)
    ledger = open_ledger(ledger_location)
    try:
        scan(ledger, [SourceRoot(src)], FP)
        root = str(src.resolve())
        paid = ledger.known_files(root, "shoot")["shoot/in-flight.jpg"].job_id
        assert paid is not None
        ledger.transition(paid, JobState.SUBMITTING, expect=JobState.PENDING)
        ledger.transition(paid, JobState.QUEUED, expect=JobState.SUBMITTING, task_id="t1",
                          charge=True)
        for name in ("culled.jpg", "in-flight.jpg"):
            (src / "shoot" / name).unlink()
        scan(ledger, [SourceRoot(src)], FP)
        assert sorted(ledger.known_files(root, "shoot")) == ["shoot/in-flight.jpg",
                                                             "shoot/kept.jpg"]
        counts = ledger.counts()
        assert (counts["pending"], counts["queued"]) == (1, 1)
    finally:
        ledger.close()


def test_folders_gone_or_emptied_are_forgotten_but_not_what_an_empty_source_held(
        ledger_location: str, tmp_path: Path) -> None:
    """A shoot moved away (with its subfolders), a folder renamed and one whose photos were
    deleted: the next scan forgets their files, on both back-ends, but for a paid result not
    saved yet. A source that comes up with nothing in it (a share's mount point with the
    share not mounted) forgets nothing."""
    src = tmp_path / "src"
    layout = ["smith/a.jpg", "smith/day two/b.jpg", "smith/day two/in-flight.jpg",
              "jones/c.jpg", "old name/d.jpg", "kept/e.jpg", "smithson/f.jpg"]
    for seed, rel in enumerate(layout):
        write_portrait(src / rel, seed=seed)
    ledger = open_ledger(ledger_location)
    root = str(src.resolve())

    def recorded() -> list[str]:
        return sorted(rel for folder in ("smith", "smith/day two", "jones", "old name",
                                         "new name", "kept", "smithson")
                      for rel in ledger.known_files(root, folder))

    try:
        scan(ledger, [SourceRoot(src)], FP)
        paid = ledger.known_files(root, "smith/day two")["smith/day two/in-flight.jpg"].job_id
        assert paid is not None
        ledger.transition(paid, JobState.SUBMITTING, expect=JobState.PENDING)
        ledger.transition(paid, JobState.QUEUED, expect=JobState.SUBMITTING, task_id="t1",
                          charge=True)
        (tmp_path / "archive").mkdir()
        (src / "smith").rename(tmp_path / "archive" / "smith")
        (src / "old name").rename(src / "new name")
        (src / "jones" / "c.jpg").unlink()
        scan(ledger, [SourceRoot(src)], FP)
        assert recorded() == ["kept/e.jpg", "new name/d.jpg",
                              "smith/day two/in-flight.jpg", "smithson/f.jpg"]
        assert ledger.counts()["pending"] == 3 and ledger.counts()["queued"] == 1

        for folder in list(src.iterdir()):  # the share is not mounted: an empty mount point
            folder.rename(tmp_path / "archive" / folder.name)
        scan(ledger, [SourceRoot(src)], FP)
        assert recorded() == ["kept/e.jpg", "new name/d.jpg",
                              "smith/day two/in-flight.jpg", "smithson/f.jpg"]
    finally:
        ledger.close()
