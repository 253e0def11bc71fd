"""Nothing but pixels leaves the studio: uploads carry no metadata and no client names, and the
results on disk get the source's metadata back. The emulator keeps what it received."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageCms, IptcImagePlugin, PngImagePlugin

from batch.emulator import Emulator
from tests.checks import ledger_of, uploaded_image
from tests.conftest import FAST_FLAGS, MakeEmulator, run_cli
from tests.imagegen import portrait

CLIENT = "Jane Doe"
SERIAL = "SN-4711-XYZ"
XMP = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
       f'22-rdf-syntax-ns#"><rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" '
       f'dc:description="{CLIENT} wedding"/></rdf:RDF></x:xmpmeta>').encode()
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
#: What must never reach the server: the name, the serial, and the containers' signatures.
SECRETS = [CLIENT.encode(), SERIAL.encode(), b"Exif\x00\x00", b"<x:xmpmeta", b"Photoshop 3.0",
           b"wedding"]


def exif(orientation: int = 1) -> Image.Exif:
    data = Image.Exif()
    data[0x013B] = CLIENT  # Artist
    data[0x0112] = orientation
    data.get_ifd(0x8769)[0xA431] = SERIAL  # BodySerialNumber
    data.get_ifd(0x8825).update({1: "N", 2: (52.0, 22.0, 7.5), 3: "E", 4: (4.0, 53.0, 2.0)})
    return data


def iptc_segment() -> bytes:
    caption = f"{CLIENT} at the altar".encode()
    record = b"\x1c\x02\x78" + struct.pack(">H", len(caption)) + caption  # 2:120 caption
    resource = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(record)) + record
    payload = b"Photoshop 3.0\x00" + resource
    return b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload


def jpeg_source(orientation: int = 1) -> bytes:
    buffer = io.BytesIO()
    portrait(400, 500, seed=3).save(buffer, "JPEG", quality=90, exif=exif(orientation),
                                    icc_profile=ICC, comment=f"for {CLIENT}", xmp=XMP)
    data = buffer.getvalue()
    return data[:2] + iptc_segment() + data[2:]


def png_source() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", CLIENT)
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    buffer = io.BytesIO()
    portrait(300, 360, seed=4).save(buffer, "PNG", pnginfo=info, exif=exif(), icc_profile=ICC)
    return buffer.getvalue()


def webp_source() -> bytes:
    buffer = io.BytesIO()
    portrait(300, 360, seed=5).save(buffer, "WEBP", lossless=True, exif=exif(), xmp=XMP,
                                    icc_profile=ICC)
    return buffer.getvalue()


SOURCES: dict[str, Callable[[], bytes]] = {
    f"{CLIENT} - wedding 014.jpg": jpeg_source,
    f"{CLIENT} - wedding 015.png": png_source,
    f"{CLIENT} - wedding 016.webp": webp_source,
}


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


@pytest.fixture
def studio(tmp_path: Path, make_emulator: MakeEmulator) -> tuple[Path, Path, Emulator]:
    src = tmp_path / f"{CLIENT} wedding"
    src.mkdir()
    for name, make in SOURCES.items():
        (src / name).write_bytes(make())
    return src, tmp_path / "out", make_emulator(record_uploads=True)


def test_uploads_carry_pixels_colour_and_nothing_else(studio: tuple[Path, Path, Emulator]) -> None:
    src, out, emulator = studio
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert len(emulator.state.uploads) == 3
    sources = {name.rsplit(".", 1)[1]: (src / name).read_bytes() for name in SOURCES}
    for body in emulator.state.uploads:
        for secret in SECRETS:
            assert secret not in body, secret  # the file name is in the body too
        image = uploaded_image(body)
        with Image.open(io.BytesIO(image)) as sent:
            fmt = sent.format or ""
            assert sent.info.get("icc_profile") == ICC
            assert not sent.getexif()
        source = sources[{"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]]
        assert pixels(image) == pixels(source)  # removed losslessly
        if fmt == "JPEG":  # not re-encoded: the compressed scan is the source's, byte for byte
            assert image[image.index(b"\xff\xda"):] == source[source.index(b"\xff\xda"):]
    names = {body.split(b'filename="', 1)[1].split(b'"', 1)[0] for body in emulator.state.uploads}
    assert all(len(n.split(b".")[0]) == 16 for n in names), names

    # The results on disk carry the studio's metadata again.
    for name in SOURCES:
        with Image.open(out / name) as saved:
            assert saved.getexif()[0x013B] == CLIENT
            assert saved.getexif().get_ifd(0x8825)[1] == "N"
            assert saved.info.get("icc_profile") == ICC
            xmp = saved.info.get("xmp") or saved.info.get("XML:com.adobe.xmp") or b""
            assert CLIENT.encode() in (xmp if isinstance(xmp, bytes) else xmp.encode())
            if saved.format == "JPEG":
                iptc = IptcImagePlugin.getiptcinfo(saved) or {}
                assert iptc.get((2, 120)) == f"{CLIENT} at the altar".encode()

    # What was removed is said, by kind.
    status = run_cli(["status", "--out", str(out)], None)
    assert "metadata removed before upload: EXIF 3, IPTC 1, XMP 3, comment 1, text 1" \
        in status.stdout, status.stdout


def test_a_rotated_source_is_sent_upright_without_its_exif(tmp_path: Path,
                                                           make_emulator: MakeEmulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "sideways.jpg").write_bytes(jpeg_source(orientation=6))
    emulator = make_emulator(record_uploads=True)
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    [body] = emulator.state.uploads
    for secret in SECRETS:
        assert secret not in body, secret
    with Image.open(io.BytesIO(uploaded_image(body))) as sent:
        assert sent.size == (500, 400)  # upright: the 400x500 source turned a quarter
        assert sent.info.get("icc_profile") == ICC
    with Image.open(out / "sideways.jpg") as saved:
        assert saved.size == (500, 400)
        assert saved.getexif()[0x0112] == 1 and saved.getexif()[0x013B] == CLIENT


def test_keep_upload_metadata_sends_the_original_bytes(studio: tuple[Path, Path, Emulator]) -> None:
    src, out, emulator = studio
    result = run_cli(["run", str(src), "--out", str(out), "--keep-upload-metadata",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    sent = {uploaded_image(body) for body in emulator.state.uploads}
    assert sent == {(src / name).read_bytes() for name in SOURCES}
    ledger = ledger_of(out)
    assert ledger.stripped() == {}
    ledger.close()


def test_the_dry_run_says_what_would_be_removed(studio: tuple[Path, Path, Emulator]) -> None:
    src, out, emulator = studio
    result = run_cli(["run", str(src), "--out", str(out), "--dry-run", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert "metadata removed before upload: EXIF 3, IPTC 1, XMP 3, comment 1, text 1" \
        in result.stdout, result.stdout
    assert emulator.state.uploads == []
