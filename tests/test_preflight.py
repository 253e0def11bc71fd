from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from batch.preflight import PrepareSettings, Rejected, preflight
from tests.imagegen import encode, portrait


def reason(data: bytes) -> str:
    with pytest.raises(Rejected) as info:
        preflight(data)
    return info.value.reason


def test_good_images_are_sent_byte_for_byte() -> None:
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encode(portrait(), fmt)
        prepared = preflight(data)
        assert prepared.payload is data and prepared.format == fmt


def test_each_bad_input_gets_a_specific_reason() -> None:
    jpeg = encode(portrait(400, 400), "JPEG")
    png = encode(portrait(400, 400), "PNG")
    assert reason(b"") == "the file is empty"
    assert "not an image" in reason(b"hello, I am text named .jpg")
    assert "truncated" in reason(jpeg[: len(jpeg) // 2])
    assert "truncated" in reason(png[: len(png) // 2]) or "damaged" in reason(png[: len(png) // 2])
    assert "CMYK" in reason(encode(portrait().convert("CMYK"), "JPEG"))
    assert "32-bit floating-point" in reason(encode(Image.new("F", (50, 50)), "TIFF"))
    assert "GIF" in reason(encode(portrait(), "GIF"))
    frames = [portrait(seed=i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:])
    assert "animated" in reason(buffer.getvalue())


def test_over_the_api_limits_is_rejected_when_fit_is_reject() -> None:
    def reason(data: bytes) -> str:
        with pytest.raises(Rejected) as info:
            preflight(data, PrepareSettings(fit="reject"))
        return info.value.reason

    assert "4096" in reason(encode(Image.new("RGB", (4096, 100)), "PNG"))
    noisy = Image.frombytes("RGB", (2000, 2000), random.Random(1).randbytes(2000 * 2000 * 3))
    big = encode(noisy, "PNG")
    assert len(big) > 10 * 1024 * 1024
    assert "10 MB" in reason(big)


def test_decompression_bomb_is_refused_without_decoding() -> None:
    header = encode(Image.new("L", (1, 1)), "PNG")
    # Rewrite IHDR to claim 100000 x 100000 pixels (CRC fixed up).
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = header[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) \
        + header[33:]
    assert "decompression bomb" in reason(bomb)


def test_a_file_that_needs_a_copy_is_checked_by_decoding_it_for_the_copy() -> None:
    """A rotated or oversized file is decoded once, for its copy: damage found there is a
    reason like any other, not a crash."""
    wide = encode(portrait(4200, 300), "JPEG")
    prepared = preflight(wide)
    assert (prepared.width, prepared.height) == (4095, 292) and prepared.note
    assert "truncated" in reason(wide[: len(wide) // 2])
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(portrait(300, 200), "JPEG", exif=exif.tobytes())
    assert (preflight(rotated).width, preflight(rotated).height) == (200, 300)
    assert "truncated" in reason(rotated[: len(rotated) // 2])
