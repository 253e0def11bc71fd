"""A corpus of hostile and broken inputs, built on the fly (some cannot live in git: a
chmod-000 file, a symlink loop, a name with a newline). Each maps to the reason it must get."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

from PIL import Image

from tests.imagegen import encode, portrait, write_portrait


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels."""
    base = encode(Image.new("L", (1, 1)), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    return base[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) \
        + base[33:]


def build(src: Path, outside: Path) -> tuple[dict[str, str], list[str]]:
    """Write the corpus under ``src``. Returns ({file name: expected reason fragment},
    [names of the valid images hidden among them])."""
    src.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (src / name).write_bytes(data)
        expected[name] = reason

    jpeg = encode(portrait(300, 300), "JPEG")
    png = encode(portrait(300, 300), "PNG")
    put("empty.jpg", b"", "the file is empty")
    put("text named.jpg", b"Dear studio, this is a letter, not a photo.\n", "not an image")
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    put("truncated.png", png[: len(png) // 2], "truncated")
    put("bomb.png", bomb_png(), "decompression bomb")
    put("cmyk.jpg", encode(portrait().convert("CMYK"), "JPEG"), "CMYK")
    put("float.tif", encode(Image.new("F", (64, 64), 0.5), "TIFF"), "32-bit floating-point")
    frames = [portrait(seed=i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:])
    put("animated.webp", buffer.getvalue(), "animated")
    put("really a gif.png", encode(portrait(), "GIF"), "GIF images are not accepted")
    put("letter.tif", b"II*\x00 this is not really a TIFF", "a TIFF this tool cannot decode")
    put("\u202eevil\u202d name.jpg", b"MZ\x90\x00 not a picture", "not an image")
    put("line\nbreak.jpg", jpeg, "line break")

    (src / "loop.jpg").symlink_to(src / "loop.jpg")
    expected["loop.jpg"] = "looping"
    write_portrait(outside / "private.jpg", seed=7)
    (src / "escape.jpg").symlink_to(outside / "private.jpg")
    expected["escape.jpg"] = "outside the source"
    put("unreadable.jpg", encode(portrait(seed=8), "JPEG"), "permission denied")
    os.chmod(src / "unreadable.jpg", 0)
    # Names in another system's encoding (Latin-1 from an old share): not valid UTF-8, shown
    # with the odd bytes escaped.
    os.makedirs(os.fsencode(src) + b"/d\xe9j\xe0 vu")
    for raw in (b"caf\xe9.jpg", b"d\xe9j\xe0 vu/inside a latin-1 folder.jpg"):
        with open(os.fsencode(src) + b"/" + raw, "wb") as handle:
            handle.write(jpeg)
    expected["caf\\xe9.jpg"] = "not valid UTF-8"
    expected["inside a latin-1 folder.jpg"] = "not valid UTF-8"
    # Deleted by the test after a scan recorded it: forgotten, so neither sent nor listed.
    (src / "vanishes.jpg").write_bytes(encode(portrait(seed=9), "JPEG"))

    valid = ["e\u0301mi\u0301lie 👩\u200d🎤 a..b.jpg", "ok.webp"]
    write_portrait(src / valid[0], seed=10)
    write_portrait(src / valid[1], "WEBP", seed=11)
    return expected, valid
