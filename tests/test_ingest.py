"""Studio files: camera-size JPEGs, EXIF orientation, TIFF/HEIC, and metadata carried over."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from PIL import Image, ImageCms, PngImagePlugin

from batch.emulator import Emulator
from batch.preflight import PrepareSettings, preflight
from tests.checks import ledger_of
from tests.conftest import FAST_FLAGS, MakeEmulator, cli_env, popen_cli, run_cli, wait_for
from tests.imagegen import portrait

XMP = (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/"
       b"22-rdf-syntax-ns#'><rdf:Description dc:rights='Studio 42' xmlns:dc='http://purl.org/"
       b"dc/elements/1.1/'/></rdf:RDF></x:xmpmeta>")
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS R5"
    exif[0x013B], exif[0x8298] = "Ana Photographer", "(c) 2026 Studio 42"
    exif[0x0112] = orientation
    sub = exif.get_ifd(0x8769)
    sub[0x9003], sub[0xA434] = "2026:11:24 01:02:03", "RF85mm F1.2 L USM"
    return exif.tobytes()


def camera_jpeg(size: tuple[int, int], orientation: int = 1, grain: int = 0) -> bytes:
    image = portrait(*size, seed=3)
    if grain:
        noise = Image.frombytes("RGB", size, random.Random(1).randbytes(size[0] * size[1] * 3))
        image = Image.blend(image, noise, grain / 100)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=camera_exif(orientation), icc_profile=ICC,
               xmp=XMP)
    return buffer.getvalue()


def assert_metadata_kept(path: Path) -> None:
    with Image.open(path) as image:
        exif = image.getexif()
        assert (exif[0x010F], exif[0x0110]) == ("Canon", "EOS R5")
        assert exif[0x013B] == "Ana Photographer" and exif[0x8298] == "(c) 2026 Studio 42"
        assert exif.get(0x0112, 1) == 1, "the result is upright: orientation must be reset"
        sub = exif.get_ifd(0x8769)
        assert sub[0x9003] == "2026:11:24 01:02:03" and sub[0xA434] == "RF85mm F1.2 L USM"
        assert image.info.get("icc_profile") == ICC
        assert b"Studio 42" in image.info.get("xmp", b"")


def test_a_45_megapixel_camera_file_is_brought_within_limits(tmp_path: Path,
                                                             emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    data = camera_jpeg((8192, 5464), grain=30)
    assert len(data) > 10 * 1024 * 1024
    (src / "IMG_0001.JPG").write_bytes(data)
    config = tmp_path / "c.toml"
    config.write_text("upscale_to_original = true\n")
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS],
                     emulator, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [task] = emulator.state.tasks.values()
    with Image.open(io.BytesIO(task.result or b"")) as uploaded_result:
        assert max(uploaded_result.size) <= 4095
    ledger = ledger_of(out)
    [job] = ledger.jobs_in(list(__import__("batch.states").states.JobState))
    note = ledger.history(job.id)[0]["message"]
    ledger.close()
    assert "resized from 8192x5464" in note
    with Image.open(out / "IMG_0001.JPG") as output:
        assert output.size == (8192, 5464), "upscale_to_original restores the dimensions"
    assert_metadata_kept(out / "IMG_0001.JPG")


def test_files_within_limits_go_byte_for_byte_and_keep_their_metadata(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    data = camera_jpeg((300, 400))
    (src / "small.jpg").write_bytes(data)
    assert preflight(data, PrepareSettings(upload_metadata="keep")).payload is data
    sent = preflight(data).payload  # the same image data, its metadata left behind
    assert sent[sent.index(b"\xff\xda"):] == data[data.index(b"\xff\xda"):]
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    assert emulator.state.submitted_digests == [__import__("hashlib").sha256(sent).hexdigest()]
    assert_metadata_kept(out / "small.jpg")


@pytest.mark.parametrize(("fmt", "name", "lossless"), [
    ("WEBP", "client.webp", False), ("PNG", "client.png", True)])
def test_webp_and_png_results_keep_their_metadata(tmp_path: Path, emulator: Emulator, fmt: str,
                                                  name: str, lossless: bool) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", XMP.decode())  # Pillow writes PNG XMP only this way
    portrait(240, 300, seed=8).save(src / name, fmt, exif=camera_exif(), icc_profile=ICC,
                                    xmp=XMP, pnginfo=xmp)
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    assert_metadata_kept(out / name)
    [task] = emulator.state.tasks.values()
    with Image.open(io.BytesIO(task.result or b"")) as returned, Image.open(out / name) as kept:
        assert kept.format == fmt
        assert kept.tobytes() == returned.tobytes(), "metadata must not change the pixels"
    if not lossless:
        assert kept_chunks(out / name)[:2] == [b"VP8X", b"ICCP"]


def kept_chunks(path: Path) -> list[bytes]:
    data, pos, found = path.read_bytes(), 12, []
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        found.append(data[pos : pos + 4])
        pos += 8 + size + (size & 1)
    return found


def test_exif_orientation_is_applied_before_upload(tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    sideways = portrait(300, 200, seed=5)  # stored 300 wide, displayed upright as 200x300
    buffer = io.BytesIO()
    sideways.save(buffer, "JPEG", exif=camera_exif(orientation=6), icc_profile=ICC, xmp=XMP)
    (src / "rotated.jpg").write_bytes(buffer.getvalue())
    assert run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator).returncode == 0
    [task] = emulator.state.tasks.values()
    with Image.open(io.BytesIO(task.result or b"")) as sent:
        assert sent.size == (200, 300), "the API must see the face upright"
    with Image.open(out / "rotated.jpg") as output:
        assert output.size == (200, 300)
    assert_metadata_kept(out / "rotated.jpg")


def test_tiff_is_converted_and_fit_reject_refuses_big_files(tmp_path: Path,
                                                            emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    portrait(240, 300, seed=2).save(src / "scan.tiff", "TIFF")
    portrait(4200, 300, seed=4).save(src / "panorama.png", "PNG")
    config = tmp_path / "c.toml"
    config.write_text('fit = "reject"\n')
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS],
                     emulator)
    assert result.returncode == 1
    assert (out / "scan.jpg").is_file(), "a TIFF comes back as JPEG with the same stem"
    assert "panorama.png" in result.stdout and "4096" in result.stdout
    assert emulator.stats["submits"] == 1


def test_heic_is_converted_when_the_extra_is_installed(tmp_path: Path,
                                                      emulator: Emulator) -> None:
    """Without the HEIC extra an iPhone photo is listed with what to install, nothing paid;
    the first run after it is installed sends it (it does not stay rejected for good)."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    portrait(240, 300, seed=6).save(src / "phone.HEIC", "HEIF", quality=90)
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]
    without = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['pillow_heif'] = None; "
         "from batch.cli import main; main()", *args],
        capture_output=True, text=True, env=cli_env(emulator), timeout=120)
    assert without.returncode == 1, without.stdout + without.stderr
    assert "HEIC support is not installed (pip install 'skinbatch[heic]')" in without.stdout
    assert emulator.stats.get("submits", 0) == 0
    result = run_cli(args, emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    assert emulator.stats["charged"] == 1
    with Image.open(out / "phone.jpg") as output:
        assert output.format == "JPEG" and output.size == (240, 300)


def test_resizing_is_recorded_in_the_note() -> None:
    big = io.BytesIO()
    portrait(5000, 3000).save(big, "JPEG", quality=90)
    prepared = preflight(big.getvalue(), PrepareSettings(max_side=2000))
    assert (prepared.width, prepared.height) == (2000, 1200)
    assert prepared.note is not None and "resized from 5000x3000" in prepared.note


def test_the_next_files_are_prepared_while_one_is_sent(tmp_path: Path,
                                                       make_emulator: MakeEmulator) -> None:
    """Preparing a copy (CPU) does not wait for an upload slot: with --concurrency 1 and a
    slow line, the other files' copies (their previews are made from them) are ready before
    the first upload has arrived, and the server still never receives two at once."""
    emulator = make_emulator(upload_bandwidth=250_000)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(camera_jpeg((900 + i, 1100), orientation=6, grain=30))
    proc = popen_cli(["run", str(src), "--out", str(out), "--concurrency", "1", *FAST_FLAGS],
                     emulator)
    seen: list[tuple[int, int]] = []

    def prepared_or_arrived() -> bool:
        previews = len(list((out / ".skinbatch" / "thumbs").rglob("*.jpg")))
        arrived = emulator.stats.get("submits", 0)  # read after: the previews came first
        seen.append((previews, arrived))
        return previews == 3 or arrived > 0

    wait_for(prepared_or_arrived)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    assert seen[-1] == (3, 0)
    spans = sorted(emulator.state.upload_spans)
    assert len(spans) == 3 and spans[0][2] > 400_000  # each held the line over 1.5 s
    assert all(done <= start for (_, done, _), (start, _, _) in pairwise(spans))
