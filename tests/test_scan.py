from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from batch.ledger import open_ledger
from batch.options import Options
from batch.scan import SourceRoot, scan
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


def test_many_small_files_are_hashed_in_worker_processes_correctly(tmp_path: Path) -> None:
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
    """The scan's fast paths (driver-level executemany, per-folder lookups, digests) on both
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
