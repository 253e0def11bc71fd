"""The CLI contract against the emulator over real loopback HTTP."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

from PIL import Image, ImageCms, ImageDraw

from batch.emulator import Emulator
from tests.checks import assert_outputs_right, ledger_of, sha
from tests.conftest import API_KEY, FAST_FLAGS, MakeEmulator, run_cli
from tests.imagegen import mixed_tree, portrait, write_portrait


def file_mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and ".skinbatch" not in p.parts}


def test_a_mixed_tree_is_retouched_once_and_a_rerun_sends_nothing(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "shoot 0412", tmp_path / "retouched"
    tree = mixed_tree(src, 32)
    copy_rel = "duplicates/copy of portrait 00.jpg"
    (src / "duplicates").mkdir()
    shutil.copy(src / "portrait 00.jpg", src / copy_rel)
    tree[copy_rel] = tree["portrait 00.jpg"]

    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--skin-smoothing",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert "33 files scanned" in result.stdout and "32 done" in result.stdout

    assert_outputs_right(out, tree, emulator)
    assert sorted(emulator.state.submitted_digests) == sorted({sha(d) for d in tree.values()})
    assert {t.enabled for t in emulator.state.tasks.values()} == {
        frozenset({"smart_skin", "skin_smoothing"})}

    before, mtimes = emulator.stats, file_mtimes(out)
    again = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--skin-smoothing",
                     *FAST_FLAGS], emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats == before, "a finished folder must send nothing"
    assert file_mtimes(out) == mtimes, "a finished folder must rewrite nothing"


def test_a_copy_whose_long_name_is_in_japanese_is_saved_too(
        tmp_path: Path, emulator: Emulator) -> None:
    """The second output of one content is written through a temp file named after it: a
    name of 250 bytes in three-byte characters must still leave that temp name within 255."""
    src, out = tmp_path / "src", tmp_path / "out"
    data = write_portrait(src / "a.jpg", seed=1)
    long_name = "婚礼写真" * 20 + "集合.jpg"  # 82 characters, 250 bytes
    shutil.copy(src / "a.jpg", src / long_name)
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    assert emulator.stats["charged"] == 1
    assert_outputs_right(out, {"a.jpg": data, long_name: data}, emulator)


def test_chosen_photos_land_at_the_top_of_out_and_a_folder_given_twice_is_one_source(
        tmp_path: Path, emulator: Emulator) -> None:
    """`run a.jpg b.jpg --out picks` saves picks/a.jpg and picks/b.jpg (a folder given with
    them still gets its subfolder; a second photo of the same name gets one numbered); the
    same folder given twice (`shoot shoot/`) is one source, saved straight into --out."""
    shoot, other = tmp_path / "shoot", tmp_path / "other"
    a = write_portrait(shoot / "a.jpg", seed=1)
    b = write_portrait(shoot / "b.jpg", seed=2)
    c = write_portrait(shoot / "more" / "c.jpg", seed=3)
    a2 = write_portrait(other / "a.jpg", seed=4)
    picks = tmp_path / "picks"
    result = run_cli(["run", str(shoot / "a.jpg"), str(shoot / "b.jpg"), str(shoot / "more"),
                      str(other / "a.jpg"), "--out", str(picks), "--smart-skin", *FAST_FLAGS],
                     emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_outputs_right(picks, {"a.jpg": a, "b.jpg": b, "more/c.jpg": c,
                                 "a.jpg-2/a.jpg": a2}, emulator)
    assert sorted(p.name for p in picks.iterdir()) == [".skinbatch", "a.jpg", "a.jpg-2",
                                                       "b.jpg", "more"]
    twice = tmp_path / "twice"
    result = run_cli(["run", str(shoot), f"{shoot}/", "--out", str(twice), "--smart-skin",
                      *FAST_FLAGS, "--pay-again"], emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_outputs_right(twice, {"a.jpg": a, "b.jpg": b, "more/c.jpg": c}, emulator)
    assert sorted(p.name for p in twice.iterdir()) == [".skinbatch", "a.jpg", "b.jpg", "more"]
    assert emulator.stats["charged"] == 4 + 3  # --pay-again: paid for again, as asked


def test_a_tiff_master_beside_its_jpeg_export_gets_an_output_of_its_own(
        tmp_path: Path, emulator: Emulator) -> None:
    """IMG_1.tif and IMG_1.jpg in one folder (a master and its export; an iPhone's HEIC and
    JPG): the TIFF comes back as a JPEG, and both would be IMG_1.jpg, so one paid result
    would be refused as 'a different file already exists'. The JPEG keeps its name; the
    TIFF's result is IMG_1.tif.jpg. A TIFF beside a PNG sent as a (JPEG) copy: each keeps its
    whole name. A TIFF alone is IMG_2.jpg."""
    src, out = tmp_path / "src", tmp_path / "out"
    master = write_portrait(src / "IMG_1.tif", fmt="TIFF", seed=1)
    export = write_portrait(src / "IMG_1.jpg", seed=2)
    upper = write_portrait(src / "IMG_3.JPG", seed=4)  # one name on a case-blind --out
    write_portrait(src / "IMG_3.tif", fmt="TIFF", seed=5)
    alone = write_portrait(src / "IMG_2.tif", fmt="TIFF", seed=3)
    write_portrait(src / "IMG_4.tif", fmt="TIFF", seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # sideways: sent as an upright JPEG copy, and comes back a JPEG
    write_portrait(src / "IMG_4.png", fmt="PNG", seed=7, exif=exif.tobytes())
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    assert emulator.stats["charged"] == 7
    assert sorted(p.name for p in out.iterdir()) == [
        ".skinbatch", "IMG_1.jpg", "IMG_1.tif.jpg", "IMG_2.jpg", "IMG_3.JPG", "IMG_3.tif.jpg",
        "IMG_4.png.jpg", "IMG_4.tif.jpg"]
    assert_outputs_right(out, {"IMG_1.jpg": export, "IMG_3.JPG": upper}, emulator)
    for name, data in (("IMG_1.tif.jpg", master), ("IMG_2.jpg", alone)):
        with Image.open(out / name) as saved, Image.open(io.BytesIO(data)) as source:
            assert saved.format == "JPEG" and saved.size == source.size
    again = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert again.returncode == 0 and emulator.stats["charged"] == 7


def with_caption(path: Path, caption: bytes) -> None:
    """What Photo Mechanic or Bridge do to a JPEG: a metadata segment written in, the image
    data untouched."""
    data = path.read_bytes()
    segment = b"\xff\xfe" + (len(caption) + 2).to_bytes(2, "big") + caption
    path.write_bytes(data[:2] + segment + data[2:])


def test_a_caption_written_into_a_delivered_photo_does_not_pay_again(
        tmp_path: Path, emulator: Emulator) -> None:
    """Captions, keywords and ratings written into delivered photos leave them the same
    photos: the next night pays nothing for them. A copy with a caption of its own is the
    same photo too. Edited pixels are a new photo, paid once more."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg", seed=1)
    write_portrait(src / "b.jpg", seed=2)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 0
    assert emulator.stats["charged"] == 2
    delivered = (out / "a.jpg").read_bytes()
    with_caption(src / "a.jpg", b"Bride and groom, first dance")
    shutil.copy(src / "a.jpg", src / "a for the album.jpg")
    with_caption(src / "a for the album.jpg", b"Album pick")
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stdout + again.stderr
    assert emulator.stats["charged"] == 2
    assert (out / "a.jpg").read_bytes() == delivered
    assert (out / "a for the album.jpg").read_bytes() == delivered
    write_portrait(src / "b.jpg", seed=3)  # retouched by hand: other pixels
    third = run_cli(args, emulator)
    assert third.returncode == 0 and emulator.stats["charged"] == 3


def exif_of(path: Path) -> dict[int, object]:
    with Image.open(path) as image:
        exif = image.getexif()
        return {**exif, **{0x8825: dict(exif.get_ifd(0x8825))}}


def without_exif(data: bytes) -> bytes:
    """What ``exiftool -all=`` leaves of a JPEG: its segments but the EXIF, the image data
    untouched."""
    from batch.metadata import EXIF_HEADER, jpeg_segments

    segments = list(jpeg_segments(data))
    kept = b"".join(data[start:end] for marker, payload, start, end in segments
                    if not (marker == 0xE1 and payload.startswith(EXIF_HEADER)))
    return data[:2] + kept + data[segments[-1][3]:]


def test_each_copy_of_a_photo_gets_its_own_metadata_on_its_output(
        tmp_path: Path, emulator: Emulator) -> None:
    """The web copy of a photo, its location and names taken out (``exiftool -all=``), is the
    same photo as the original, paid once; but its output must not get them back from the
    original's, nor must a copy found later, or an output written again from another's."""
    src, out = tmp_path / "src", tmp_path / "out"
    exif = Image.Exif()
    exif[0x013B], exif[0x8298] = "Ana Photographer", "(c) 2026 Studio 42"
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 24.0)})
    original = write_portrait(src / "IMG_1.jpg", seed=1, exif=exif.tobytes())
    (src / "web").mkdir()
    (src / "web" / "IMG_1.jpg").write_bytes(without_exif(original))
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 0
    assert emulator.stats["charged"] == 1
    assert exif_of(out / "IMG_1.jpg")[0x8825] == {1: "N", 2: (48.0, 51.0, 24.0)}
    assert exif_of(out / "web" / "IMG_1.jpg") == {0x8825: {}}

    exif = Image.Exif()
    exif[0x013B] = "Second Shooter"
    (src / "later").mkdir()
    later = without_exif(original)[:2] + b"\xff\xe1" + (len(exif.tobytes()) + 8).to_bytes(
        2, "big") + b"Exif\x00\x00" + exif.tobytes() + without_exif(original)[2:]
    (src / "later" / "IMG_1.jpg").write_bytes(later)  # the same image, other names on it
    (out / "web" / "IMG_1.jpg").unlink()  # written again from the original's output
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats["charged"] == 1
    assert exif_of(out / "web" / "IMG_1.jpg") == {0x8825: {}}
    assert exif_of(out / "later" / "IMG_1.jpg")[0x013B] == "Second Shooter"
    assert exif_of(out / "later" / "IMG_1.jpg")[0x8825] == {}
    with Image.open(out / "IMG_1.jpg") as first, Image.open(out / "later" / "IMG_1.jpg") as copy:
        assert first.tobytes() == copy.tobytes()  # one result, each with its own names


def test_outputs_moved_out_of_out_after_delivery_are_not_bought_again(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Studios move delivered files to the client's folder. Past the download link's life a
    result is no longer to be had for free: the next night bought it again (on_expired =
    resubmit). A photo paid for is never paid again unasked: its output is left gone, said
    once in the log. Within the link's life a deleted output is still written again."""
    emulator = make_emulator(result_ttl=1.0)  # links dead before the next run starts
    src, out = tmp_path / "src", tmp_path / "out"
    data = write_portrait(src / "a.jpg", seed=1)
    write_portrait(src / "b.jpg", seed=2)
    config = tmp_path / "c.toml"
    config.write_text("result_ttl = 1.0\nexpiry_margin = 0.0\n")  # as the emulator's links
    args = ["run", str(src), "--out", str(out), "--config", str(config), "--smart-skin",
            *FAST_FLAGS]
    assert run_cli(args, emulator).returncode == 0 and emulator.stats["charged"] == 2
    (tmp_path / "client").mkdir()
    (out / "a.jpg").rename(tmp_path / "client" / "a.jpg")
    time.sleep(1.5)  # the links' one second has passed
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stdout + again.stderr
    assert emulator.stats["charged"] == 2
    assert not (out / "a.jpg").exists()
    assert "1 output(s) of photos already retouched are gone from --out" in again.stderr

    fresh = make_emulator()
    other = tmp_path / "other"
    first = run_cli(["run", str(src), "--out", str(other), "--smart-skin", *FAST_FLAGS,
                     "--pay-again"], fresh)
    assert first.returncode == 0 and fresh.stats["charged"] == 2
    (other / "a.jpg").unlink()  # deleted by mistake, the link alive: written again, free
    assert run_cli(["run", str(src), "--out", str(other), "--smart-skin", *FAST_FLAGS],
                   fresh).returncode == 0
    assert fresh.stats["charged"] == 2
    assert_outputs_right(other, {"a.jpg": data}, fresh)


def test_changed_options_are_held_until_paid_again_and_renames_do_not_pay(
        tmp_path: Path, emulator: Emulator) -> None:
    """A rename pays nothing. Options changed (a nightly config edited) would pay again for
    every photo retouched before, each new result replacing the saved one: such photos are
    held, said by the dry run and the run (-q, cron), exit 1, until --pay-again sends them."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg", seed=1)
    assert run_cli(["run", str(src), "--out", str(out), "--acne-removal", *FAST_FLAGS],
                   emulator).returncode == 0
    (src / "a.jpg").rename(src / "renamed.jpg")
    assert run_cli(["run", str(src), "--out", str(out), "--acne-removal", *FAST_FLAGS],
                   emulator).returncode == 0
    assert emulator.stats["charged"] == 1
    saved = (out / "a.jpg").read_bytes()
    assert (out / "renamed.jpg").read_bytes() == saved
    brighter = ["run", str(src), "--out", str(out), "--skin-brightening", *FAST_FLAGS]
    held = ("1 photo(s) were retouched before under other options and are not sent again "
            "unasked: each would be paid again, its new result replacing the saved one. "
            "--pay-again sends them")
    assert held in run_cli([*brighter, "--dry-run"], emulator).stdout
    for night in range(2):  # said every night until someone decides
        waiting = run_cli([*brighter, "-q"], emulator)
        assert waiting.returncode == 1 and held in waiting.stderr, (night, waiting.stderr)
    assert emulator.stats["charged"] == 1 and (out / "renamed.jpg").read_bytes() == saved
    status = json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)
    assert [(p["path"], p["state"]) for p in status["problems"]] == [(str(src), "held")]
    assert held in status["problems"][0]["reason"]
    # Paid again on purpose: said before (the dry run) and as the run starts.
    words = ("1 photo(s) to pay for were retouched before under other options: changed options "
             "send a photo again, paid again, and its new result replaces the earlier one")
    assert words in run_cli([*brighter, "--pay-again", "--dry-run"], emulator).stdout
    changed = run_cli([*brighter, "--pay-again", "-q"], emulator)
    assert changed.returncode == 0 and words in changed.stderr, changed.stderr
    assert emulator.stats["charged"] == 2
    assert {t.enabled for t in emulator.state.tasks.values()} == {
        frozenset({"acne_removal"}), frozenset({"skin_brightening"})}
    again = run_cli([*brighter, "-q"], emulator)  # nothing more to pay: nothing said
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert json.loads(run_cli(["status", "--out", str(out), "--json"], None).stdout)[
        "problems"] == []


def test_a_cutouts_result_keeps_its_transparency(tmp_path: Path, emulator: Emulator) -> None:
    """Headshots cut out from their background for a web page: the API's docs do not say a
    result keeps an alpha channel, and the emulator's, like a JPEG copy's, does not. Each
    result gets its source's transparency back, in a PNG where it came back a JPEG, with its
    colour profile; an opaque source's result is left as it came."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    masks = {}
    for name, seed in (("headshot.png", 1), ("master.tif", 2)):
        photo = portrait(seed=seed).convert("RGBA")
        mask = Image.new("L", photo.size, 0)
        ImageDraw.Draw(mask).ellipse((12, 8, photo.width - 12, photo.height - 8), fill=255)
        photo.putalpha(mask)
        photo.save(src / name, icc_profile=profile)
        masks[name] = mask
    portrait(seed=3).convert("RGBA").save(src / "opaque.png")
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    for source, output in (("headshot.png", "headshot.png"), ("master.tif", "master.png")):
        with Image.open(out / output) as saved:
            assert (saved.format, saved.mode) == ("PNG", "RGBA")
            assert saved.getchannel("A").tobytes() == masks[source].tobytes()
            assert saved.info.get("icc_profile") == profile
            with Image.open(src / source) as original:  # retouched, not the source again
                assert saved.convert("RGB").tobytes() != original.convert("RGB").tobytes()
    with Image.open(out / "opaque.png") as saved:
        assert "A" not in saved.getbands()


def test_bad_inputs_are_never_sent_and_are_named_with_reasons(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    good = {"ok.jpg": write_portrait(src / "ok.jpg")}
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("this is not a photo")
    png = write_portrait(src / "whole.png", "PNG", seed=3)
    (src / "whole.png").unlink()
    (src / "cut.png").write_bytes(png[: len(png) // 2])
    write_portrait(src / "cmyk.jpg", seed=4)
    from PIL import Image
    Image.open(src / "cmyk.jpg").convert("CMYK").save(src / "cmyk.jpg")
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 1, result.stderr
    assert emulator.stats["submits"] == 1
    assert_outputs_right(out, good, emulator)
    status = run_cli(["status", "--out", str(out), "--json"], None)
    problems = {Path(p["path"]).name: p for p in json.loads(status.stdout)["problems"]}
    assert set(problems) == {"empty.jpg", "notes.jpg", "cut.png", "cmyk.jpg"}
    assert problems["empty.jpg"]["reason"] == "the file is empty"
    assert "not an image" in problems["notes.jpg"]["reason"]
    assert "truncated" in problems["cut.png"]["reason"] or "damaged" in problems["cut.png"][
        "reason"]
    assert "CMYK" in problems["cmyk.jpg"]["reason"]
    assert all(p["state"] == "rejected" for p in problems.values())
    text = run_cli(["status", "--out", str(out)], None).stdout
    assert "notes.jpg" in text and "rejected" in text


def test_a_photo_without_a_face_fails_with_the_api_code(
        tmp_path: Path, emulator: Emulator) -> None:
    """The bundled emulator finds no face in a sky or a blank grey frame; a black-and-white
    portrait it retouches like any other."""
    from PIL import Image, ImageChops, ImageStat
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    Image.new("RGB", (120, 120), (20, 40, 200)).save(src / "sky.png")
    Image.new("L", (120, 120), 200).save(src / "blank.jpg")
    write_portrait(src / "black and white.png", "PNG", seed=3, size=(300, 400))
    with Image.open(src / "black and white.png") as colour:
        colour.convert("L").save(src / "black and white.png")
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS],
                     emulator)
    assert result.returncode == 1
    # The API's code is said once a line, with its HTTP status and the ids to quote.
    status = run_cli(["status", "--out", str(out)], None).stdout
    for printed in (result.stdout, status):
        failed = [line for line in printed.splitlines() if "sky.png" in line]
        assert len(failed) == 1 and failed[0].count("ERROR_NO_FACE_IN_FILE") == 1, printed
        assert "HTTP 422" in failed[0] and "request_id=" in failed[0], failed
    ledger = ledger_of(out)
    problems = ledger.problems()
    assert sorted(Path(p.path).name for p in problems) == ["blank.jpg", "sky.png"]
    assert {(p.state, p.error_code, p.http_status) for p in problems} == {
        ("failed", "ERROR_NO_FACE_IN_FILE", 422)}
    ledger.close()
    with Image.open(src / "black and white.png") as source, \
            Image.open(out / "black and white.png") as saved:
        assert ImageStat.Stat(ImageChops.difference(source.convert("L"),
                                                    saved.convert("L"))).mean[0] > 0.5


def test_an_existing_different_output_is_never_overwritten_nor_paid_for(
        tmp_path: Path, emulator: Emulator) -> None:
    """A file of someone else's at a photo's output (the client's own edit; the outputs of a
    ledger someone deleted): with on_collision = "skip" the result could not be saved, so
    the photo is not sent. Once that file is moved away, the next run sends it; a TIFF's
    output is looked for under the name its JPEG result takes."""
    src, out = tmp_path / "src", tmp_path / "out"
    data = write_portrait(src / "a.jpg")
    write_portrait(src / "scan.tif", fmt="TIFF", seed=2)
    write_portrait(src / "b.jpg", seed=3)
    out.mkdir()
    (out / "a.jpg").write_bytes(b"the client's own edit")
    (out / "scan.jpg").write_bytes(b"an earlier retouch")
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    result = run_cli(args, emulator)
    assert result.returncode == 1
    assert (out / "a.jpg").read_bytes() == b"the client's own edit"
    assert (out / "scan.jpg").read_bytes() == b"an earlier retouch"
    assert result.stdout.count("already exists and is not this photo's result") == 2, \
        result.stdout
    assert emulator.stats["charged"] == 1  # b.jpg alone
    (out / "a.jpg").rename(tmp_path / "client edit.jpg")
    again = run_cli(args, emulator)
    assert again.returncode == 1 and emulator.stats["charged"] == 2
    assert_outputs_right(out, {"a.jpg": data}, emulator)


def test_a_second_shoot_into_the_same_delivery_folder_pays_only_for_what_it_can_save(
        tmp_path: Path, emulator: Emulator) -> None:
    """Camera names repeat from shoot to shoot (IMG_0001.jpg in each). A second shoot run
    into the first one's --out: its IMG_0001.jpg would land on the first shoot's result, so
    it is refused before it is paid (it was paid, then 'a different file already exists');
    a photo of the first shoot copied into the second is the same photo and pays nothing."""
    first, second, delivery = tmp_path / "A", tmp_path / "B", tmp_path / "delivery"
    a1 = write_portrait(first / "IMG_0001.jpg", seed=1)
    write_portrait(second / "IMG_0001.jpg", seed=2)
    b2 = write_portrait(second / "IMG_0002.jpg", seed=3)
    (second / "sub").mkdir()
    shutil.copy(first / "IMG_0001.jpg", second / "sub" / "IMG_0001.jpg")
    flags = ["--out", str(delivery), "--smart-skin", *FAST_FLAGS]
    assert run_cli(["run", str(first), *flags], emulator).returncode == 0
    result = run_cli(["run", str(second), *flags], emulator)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "IMG_0001.jpg already exists and is not this photo's result" in result.stdout
    assert emulator.stats["charged"] == 2  # A's IMG_0001, B's IMG_0002
    assert_outputs_right(delivery, {"IMG_0001.jpg": a1, "IMG_0002.jpg": b2,
                                    "sub/IMG_0001.jpg": a1}, emulator)


def test_a_bad_key_stops_at_once_with_exit_3_and_is_never_printed(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        write_portrait(src / f"{i}.jpg", seed=i)
    wrong = "sk-wrong-" + "s3cr3t" * 5
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator, key=wrong,
                     timeout=30)
    assert result.returncode == 3
    assert "key" in result.stderr.lower()
    assert wrong not in result.stdout + result.stderr
    status = run_cli(["status", "--out", str(out)], None).stdout
    waiting = [line for line in status.splitlines() if line.startswith("  pending")]
    assert waiting and all("not sent: " in line and "HTTP 401" in line for line in waiting), \
        status
    assert wrong not in status
    assert emulator.stats["unauthorized"] <= 4
    assert emulator.stats.get("charged", 0) == 0
    ledger_bytes = b"".join(p.read_bytes() for p in (out / ".skinbatch").iterdir() if p.is_file())
    assert wrong.encode() not in ledger_bytes


def test_no_key_is_a_configuration_error(tmp_path: Path) -> None:
    write_portrait(tmp_path / "src/a.jpg")
    result = run_cli(["run", str(tmp_path / "src"), "--out", str(tmp_path / "out")], None,
                     key=None)
    assert result.returncode == 2
    assert "AILAB_API_KEY" in result.stderr and "--emulator" in result.stderr


def test_out_of_credits_stops_keeps_paid_work_and_resumes_after_top_up(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(credits=8)
    src, out = tmp_path / "src", tmp_path / "out"
    tree = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(20)}
    args = ["run", str(src), "--out", str(out), "--concurrency", "2", *FAST_FLAGS]
    result = run_cli(args, emulator)
    assert result.returncode == 3, result.stderr
    assert "the account has 8" in result.stderr, "the estimate is told with the balance"
    assert "The balance pays for 8 of 20 image(s); sending those." in result.stderr
    assert emulator.stats["charged"] == 8
    assert emulator.stats.get("rejected_ERROR_NOT_ENOUGH_CREDITS", 0) == 0, \
        "the balance was read first: no upload may be refused for credits"
    saved = {p.name for p in out.glob("*.jpg")}
    assert len(saved) == 8, "results already paid for must still be downloaded"
    # The morning's status says why the other twelve wait, each with the account's words.
    waiting = [line for line in run_cli(["status", "--out", str(out)], None).stdout.splitlines()
               if line.startswith("  pending")]
    assert len(waiting) == 12, waiting
    assert all("not sent: the account is out of credits" in line for line in waiting), waiting

    emulator.set_credits(100)
    submits_before = emulator.stats["submits"]
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats["charged"] == 20
    assert emulator.stats["submits"] - submits_before == 12
    assert_outputs_right(out, tree, emulator)
    assert "needing attention" not in run_cli(["status", "--out", str(out)], None).stdout


def test_the_key_never_reaches_the_result_host_or_the_ledger(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg")
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    assert emulator.state.result_host_headers
    assert all("ailabapi-api-key" not in h for h in emulator.state.result_host_headers)
    assert not any(API_KEY in v for h in emulator.state.result_host_headers for v in h.values())
    for path in (out / ".skinbatch").rglob("*"):
        assert path.is_dir() or API_KEY.encode() not in path.read_bytes()


def test_credits_running_out_mid_run_stop_within_a_couple_of_requests(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(credits=8)
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(20):
        write_portrait(src / f"{i:02d}.jpg", seed=i)
    config = tmp_path / "c.toml"
    config.write_text("credits_per_image = 0.1\n")  # the estimate thinks 8 credits are plenty
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config),
                      "--concurrency", "2", *FAST_FLAGS], emulator)
    assert result.returncode == 3, result.stderr
    assert "out of credits" in result.stderr
    assert emulator.stats["charged"] == 8
    assert emulator.stats["rejected_ERROR_NOT_ENOUGH_CREDITS"] <= 3
    assert len(list(out.glob("*.jpg"))) == 8


def test_progress_bars_count_uploads_and_saves_when_asked_for(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        write_portrait(src / f"{i}.jpg", seed=i)
    flags = [f for f in FAST_FLAGS if f != "--no-progress"]
    shown = run_cli(["run", str(src), "--out", str(out), *flags, "--progress"], emulator)
    assert shown.returncode == 0, shown.stderr
    assert "uploaded" in shown.stderr and "saved" in shown.stderr
    assert "3/3" in shown.stderr
    quiet = run_cli(["run", str(src), "--out", str(tmp_path / "out2"), *FAST_FLAGS,
                     "--pay-again"], emulator)
    assert quiet.returncode == 0, quiet.stderr
    assert "uploaded" not in quiet.stderr and "saved" not in quiet.stderr
