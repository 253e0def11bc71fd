"""Per-folder presets, output naming and the collision policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch.emulator import Emulator
from tests.conftest import API_KEY, FAST_FLAGS, run_cli
from tests.imagegen import write_portrait


def test_folder_presets_set_options_and_naming_for_their_subtree(tmp_path: Path,
                                                                  emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "default.jpg", seed=1)
    write_portrait(src / "bride/a.jpg", seed=2)
    write_portrait(src / "bride/close-ups/b.jpg", seed=3)
    write_portrait(src / "broken/c.jpg", seed=4)
    write_portrait(src / "flat/d.jpg", seed=5)
    (src / "bride/.skinbatch.toml").write_text(
        'naming = "{stem}_retouched{ext}"\n[options]\nacne_removal = true\nsmart_skin = false\n')
    (src / "bride/close-ups/.skinbatch.toml").write_text("[options]\nunder_eye_correction = true\n")
    (src / "broken/.skinbatch.toml").write_text("[options]\nglow = true\n")
    (src / "flat/.skinbatch.toml").write_text("acne_removal = true\n")  # no [options] above it
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 1, result.stderr
    sent = sorted(sorted(t.enabled) for t in emulator.state.tasks.values())
    assert sent == [["acne_removal"], ["acne_removal", "under_eye_correction"], ["smart_skin"]]
    assert (out / "default.jpg").is_file()
    assert (out / "bride/a_retouched.jpg").is_file()
    assert (out / "bride/close-ups/b_retouched.jpg").is_file()
    assert not (src / "bride/a_retouched.jpg").exists()
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert status["options"] == {"acne_removal": 1, "acne_removal, under_eye_correction": 1,
                                 "smart_skin": 1}
    broken, flat = sorted(status["problems"], key=lambda p: p["path"])
    assert broken["path"].endswith("broken/c.jpg") and "unknown option: 'glow'; known: " \
        "acne_removal" in broken["reason"]
    assert flat["path"].endswith("flat/d.jpg") and "invalid: acne_removal: a retouching option " \
        "goes under [options]" in flat["reason"]
    # The run's summary counts them among the rejected, as it lists them.
    assert "3 done, 0 failed, 2 rejected" in result.stdout, result.stdout


def test_settings_saved_by_windows_notepad_are_read(tmp_path: Path, emulator: Emulator) -> None:
    """A config file, a key file and a folder preset edited on Windows (over the studio's
    share) start with a byte-order mark and end lines with CR LF: each is read as written."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "bride/a.jpg", seed=1)

    def notepad(path: Path, text: str) -> Path:
        path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
        return path

    key = notepad(tmp_path / "key.txt", API_KEY + "\n")
    key.chmod(0o600)
    config = notepad(tmp_path / "night.toml", f'api_key_file = "{key}"\nconcurrency = 2\n'
                                              "[options]\nsmart_skin = true\n")
    notepad(src / "bride/.skinbatch.toml", 'naming = "{stem}_retouched{ext}"\n')
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config),
                      *FAST_FLAGS], emulator, key=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "bride/a_retouched.jpg").is_file()
    assert [sorted(t.enabled) for t in emulator.state.tasks.values()] == [["smart_skin"]]


def test_collision_policy_suffix_and_overwrite(tmp_path: Path, emulator: Emulator) -> None:
    src = tmp_path / "src"
    write_portrait(src / "a.jpg")
    for policy, expect in (("suffix", "a-1.jpg"), ("overwrite", "a.jpg")):
        out = tmp_path / f"out-{policy}"
        out.mkdir()
        (out / "a.jpg").write_bytes(b"someone else's file")
        config = tmp_path / f"{policy}.toml"
        config.write_text(f'on_collision = "{policy}"\n')
        result = run_cli(["run", str(src), "--out", str(out), "--config", str(config),
                          *FAST_FLAGS, "--pay-again"], emulator)
        assert result.returncode == 0, result.stdout
        assert (out / expect).read_bytes()[:2] == b"\xff\xd8"
        if policy == "suffix":
            assert (out / "a.jpg").read_bytes() == b"someone else's file"


def test_a_naming_that_makes_an_output_name_too_long_is_refused_before_it_is_paid(
        tmp_path: Path, emulator: Emulator) -> None:
    """A camera export's long name, lengthened by the folder's naming, past what a file name
    may be: its result could never be saved, so it is not sent; the rest of the folder is."""
    src, out = tmp_path / "src", tmp_path / "out"
    long_stem = "wedding-" + "x" * 240
    write_portrait(src / f"{long_stem}.jpg", seed=1)
    write_portrait(src / "short.jpg", seed=2)
    (src / ".skinbatch.toml").write_text('naming = "{stem}_retouched{ext}"\n')
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert emulator.stats["submits"] == 1 and emulator.stats["charged"] == 1
    assert [p.name for p in out.iterdir() if p.name != ".skinbatch"] == ["short_retouched.jpg"]
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    [problem] = status["problems"]
    assert problem["path"].endswith(f"{long_stem}.jpg")
    assert "output's name would be 262 bytes long" in problem["reason"], problem


@pytest.mark.parametrize("on_collision", ["skip", "overwrite"])
def test_a_naming_that_gives_two_photos_one_output_sends_one_and_says_why(
        tmp_path: Path, emulator: Emulator, on_collision: str) -> None:
    """A naming without {ext} gives a TIFF master and its JPEG export one output name: only
    one result could be saved there (the second refused, or under "overwrite" replacing the
    first's), so the other photo is not sent, with the reason; once the naming keeps the
    extension, it is sent and saved under a name of its own."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "IMG_1.jpg", seed=1)
    write_portrait(src / "IMG_1.tif", fmt="TIFF", seed=2)
    write_portrait(src / "IMG_2.jpg", seed=3)
    (src / ".skinbatch.toml").write_text('naming = "{stem}_retouched.jpg"\n')
    config = tmp_path / "skinbatch.toml"
    config.write_text(f'on_collision = "{on_collision}"\n')
    args = ["run", str(src), "--out", str(out), "--config", str(config), "--smart-skin",
            *FAST_FLAGS]
    result = run_cli(args, emulator)
    assert result.returncode == 1, result.stderr
    assert emulator.stats["charged"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        ".skinbatch", "IMG_1_retouched.jpg", "IMG_2_retouched.jpg"]
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    [problem] = status["problems"]
    assert problem["path"].endswith("IMG_1.tif"), problem
    assert "would be IMG_1_retouched.jpg, which the result of IMG_1.jpg takes" \
        in problem["reason"], problem

    (src / ".skinbatch.toml").write_text('naming = "{stem}_retouched{ext}"\n')
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stdout
    assert emulator.stats["charged"] == 3
    assert (out / "IMG_1_retouched.tif.jpg").is_file()
