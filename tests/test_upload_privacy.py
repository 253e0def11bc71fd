"""Nothing but pixels leaves the studio: uploads carry no metadata and no client names, and the
results on disk get the source's metadata back. The emulator keeps what it received."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageCms, IptcImagePlugin, PngImagePlugin

from batch.emulator import Emulator
from batch.metadata import riff_chunk
from batch.preflight import photo_key
from batch.states import JobState
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
           b"wedding", b"c2pa"]


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
    return with_png_chunk(buffer.getvalue(), b"caBX", CREDENTIALS)


def webp_source() -> bytes:
    buffer = io.BytesIO()
    portrait(300, 360, seed=5).save(buffer, "WEBP", lossless=True, exif=exif(), xmp=XMP,
                                    icc_profile=ICC)
    data = buffer.getvalue() + riff_chunk(b"C2PA", CREDENTIALS)
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]


#: Content credentials (C2PA), as an editor that signs its exports writes them.
CREDENTIALS = b"jumb c2pa.assertions stds.schema-org.CreativeWork author: " + CLIENT.encode()


def with_png_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """``data`` (a PNG) with a chunk put in before IEND."""
    chunk = struct.pack(">I", len(payload)) + kind + payload + \
        struct.pack(">I", zlib.crc32(kind + payload))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


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
    assert "metadata removed before upload: C2PA 2, EXIF 3, IPTC 1, XMP 3, comment 1, text 1" \
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


def test_a_copy_made_for_upload_is_said_to_leave_the_photos_metadata_behind(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A rotated camera JPEG and a TIFF master go as copies, which carry none of their
    metadata: the dry run and status say what stayed behind, as for a file sent as it is."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "sideways.jpg").write_bytes(jpeg_source(orientation=6))
    portrait(300, 360, seed=6).save(src / "master.tif", "TIFF",
                                    tiffinfo={0x013B: CLIENT, 700: XMP})
    # A camera JPEG with its preview after it (MPF): the preview holds EXIF of its own.
    portrait(300, 360, seed=7).save(src / "camera.jpg", "MPO", save_all=True, exif=exif(),
                                    append_images=[portrait(80, 96, seed=8)])
    emulator = make_emulator(record_uploads=True)
    said = ("metadata removed before upload: EXIF 3, IPTC 1, XMP 2, appended 1, comment 1, "
            "other 1")
    dry = run_cli(["run", str(src), "--out", str(out), "--dry-run", *FAST_FLAGS], emulator)
    assert said in dry.stdout, dry.stdout
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert len(emulator.state.uploads) == 3
    for body in emulator.state.uploads:
        for secret in SECRETS:
            assert secret not in body, secret
    status = run_cli(["status", "--out", str(out)], None)
    assert said in status.stdout, status.stdout


def test_what_a_phone_appends_after_the_image_is_not_uploaded(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A motion photo (a phone's JPEG with seconds of video, and its sound, appended after
    the image) went up whole: the upload carried the video. The image goes, byte for byte;
    the photo's key is as before, so a ledger that knew the photo does not pay for it again."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    image = jpeg_source()
    video = b"\x00\x00\x00\x18ftypmp42" + f"the vows, {CLIENT} speaking".encode() * 500
    (src / "PXL_0412.MP.jpg").write_bytes(image + video)
    emulator = make_emulator(record_uploads=True)
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    [body] = emulator.state.uploads
    sent = uploaded_image(body)
    for secret in [*SECRETS, b"ftypmp42", b"the vows"]:
        assert secret not in body, secret
    assert sent[sent.index(b"\xff\xda"):] == image[image.index(b"\xff\xda"):]
    status = run_cli(["status", "--out", str(out)], None)
    assert "appended 1" in status.stdout, status.stdout
    ledger = ledger_of(out)
    [job] = ledger.jobs_in(list(JobState))
    ledger.close()
    assert job.content_sha256 == photo_key(image + video, True)


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
    assert "metadata removed before upload: C2PA 2, EXIF 3, IPTC 1, XMP 3, comment 1, text 1" \
        in result.stdout, result.stdout
    assert emulator.state.uploads == []


def test_a_tiff_master_or_a_long_xmp_history_gives_its_photo_metadata_to_a_saved_result(
        tmp_path: Path, emulator: Emulator) -> None:
    """A TIFF's first directory is the TIFF's own layout too (strips, compression) and holds
    blobs (XMP, IPTC, Photoshop's layers): the JPEG result gets the tags that describe the
    photo, and a blob past a JPEG segment's 64 KB is left off rather than stopping the run.
    A JPEG whose XMP runs over several segments (extended XMP) keeps them all."""
    from PIL import TiffImagePlugin

    src, out = tmp_path / "masters", tmp_path / "out"
    src.mkdir()
    history = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b"<!-- step -->" * 8000 + \
        b"</x:xmpmeta>"
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x013B], tags[0x8298], tags[0x010F] = CLIENT, "(c) Studio", "Canon"
    tags[700], tags[37724] = history, b"\0" * 200_000  # XMP history, Photoshop's layers
    portrait(300, 400, seed=6).save(src / "master.tif", tiffinfo=tags, compression="tiff_lzw")
    extension = (b"http://ns.adobe.com/xmp/extension/\x00" + b"0" * 32
                 + struct.pack(">II", 40, 0) + b"<rdf:Description>" + b"x" * 23)
    export = jpeg_source()
    export = export[:2] + b"\xff\xe1" + struct.pack(">H", len(extension) + 2) + extension \
        + export[2:]
    (src / "export.jpg").write_bytes(export)
    result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    with Image.open(out / "master.jpg") as saved:
        tags_saved = saved.getexif()
    assert (tags_saved[0x013B], tags_saved[0x8298], tags_saved[0x010F]) == (
        CLIENT, "(c) Studio", "Canon")
    assert not {0x0103, 0x0111, 0x0117, 0x0102, 700, 37724} & set(tags_saved), set(tags_saved)
    assert extension in (out / "export.jpg").read_bytes()


def test_a_photoshop_tiff_masters_iptc_reaches_its_result(tmp_path: Path,
                                                          emulator: Emulator) -> None:
    """A TIFF master's IPTC records (caption, copyright, keywords: what Photo Mechanic and
    many archives read first), kept by Photoshop in the TIFF's IPTC-NAA tag typed as 32-bit
    integers, of which Pillow reads only the first: the JPEG result carries them whole."""
    from PIL import TiffImagePlugin

    src = tmp_path / "masters"
    src.mkdir()
    records = b""
    for dataset, value in ((120, f"{CLIENT} at the altar".encode()), (116, b"(c) Studio"),
                           (25, b"wedding"), (25, b"altar")):
        records += b"\x1c\x02" + bytes([dataset]) + struct.pack(">H", len(value)) + value
    records += b"\x00" * (-len(records) % 4)
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[33723] = records
    buffer = io.BytesIO()
    portrait(300, 400, seed=7).save(buffer, "TIFF", tiffinfo=tags)
    master = bytearray(buffer.getvalue())  # the tag typed as Photoshop types it: LONG
    entry = master.index(struct.pack("<HHI", 33723, 7, len(records)))
    master[entry:entry + 8] = struct.pack("<HHI", 33723, 4, len(records) // 4)
    (src / "master.tif").write_bytes(master)
    result = run_cli(["run", str(src), "--out", str(tmp_path / "out"), "--smart-skin",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "master.jpg") as saved:
        iptc = IptcImagePlugin.getiptcinfo(saved) or {}
    assert iptc.get((2, 120)) == f"{CLIENT} at the altar".encode()
    assert (iptc.get((2, 116)), iptc.get((2, 25))) == (b"(c) Studio", [b"wedding", b"altar"])


def test_a_masters_long_editing_history_leaves_its_rights_on_the_result(
        tmp_path: Path, emulator: Emulator) -> None:
    """A TIFF master's XMP holds Lightroom's or Photoshop's editing history, every step of
    it, and grows past what a JPEG segment holds (64 KB): the JPEG result keeps its rights,
    caption and keywords, without the history, rather than no XMP at all."""
    from PIL import TiffImagePlugin

    steps = b"".join(b'<rdf:li stEvt:action="saved" stEvt:instanceID="xmp.iid:%032d" '
                     b'stEvt:when="2026-12-01T10:00:00" stEvt:softwareAgent="Adobe '
                     b'Photoshop 26.0" stEvt:changed="/"/>' % n for n in range(1000))
    xmp = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:'
           b'meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
           b'xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/" '
           b'xmlns:stEvt="http://ns.adobe.com/xap/1.0/sType/ResourceEvent#">'
           b'<dc:rights><rdf:Alt><rdf:li xml:lang="x-default">(c) Studio</rdf:li></rdf:Alt>'
           b'</dc:rights><xmpMM:History><rdf:Seq>' + steps + b'</rdf:Seq></xmpMM:History>'
           b'</rdf:Description></rdf:RDF></x:xmpmeta>' + b" " * 2048
           + b'<?xpacket end="w"?>')
    assert len(xmp) > 100_000
    src = tmp_path / "masters"
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[700] = xmp
    src.mkdir()
    portrait(300, 400, seed=8).save(src / "master.tif", tiffinfo=tags)
    result = run_cli(["run", str(src), "--out", str(tmp_path / "out"), "--smart-skin",
                      *FAST_FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "master.jpg") as saved:
        carried = saved.info.get("xmp", b"")
    assert b"(c) Studio" in carried and b"xmpMM:History" not in carried, carried[:300]


def test_removing_credentials_from_uploads_leaves_the_photos_key_as_it_was() -> None:
    """A ledger keyed a PNG with content credentials before they were removed from uploads:
    its key still counts them, so the photo, renamed or copied, is the one paid for and not
    a new one."""
    import hashlib

    from batch.preflight import photo_key

    data = png_source()
    kept, pos = [data[:8]], 8
    while pos < len(data):  # the key's rule for PNGs before: text, EXIF and time chunks out
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        end = pos + 12 + length
        if data[pos + 4:pos + 8] not in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"):
            kept.append(data[pos:end])
        pos = end
    assert photo_key(data, by_image=True) == hashlib.sha256(b"".join(kept)).hexdigest()
