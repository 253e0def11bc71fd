"""A cutout's transparency, put back on its result.

A portrait cut out from its background (a PNG, WEBP or TIFF headshot for a web page) is sent
with its alpha channel, or flattened when it goes as a JPEG copy, and the API's docs do not say
that a result keeps one: a result without it puts the cutout on a flat background. Skin
retouching moves no pixel, so the source's alpha, scaled to the result's size, is the result's.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

#: Result formats that hold an alpha channel; a result in any other (a JPEG) becomes a PNG.
WITH_ALPHA = frozenset({"PNG", "WEBP"})


def restored(source: bytes, result: bytes, result_format: str, quality: int = 92
             ) -> tuple[bytes, str] | None:
    """The result with the source's transparency, and its format now; None when the source
    has none (no alpha channel, or one opaque everywhere) or the result kept its own."""
    with Image.open(io.BytesIO(source)) as image:
        if "A" not in image.getbands() and "transparency" not in image.info:
            return None  # told by the header: no source without transparency is decoded
        alpha = ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
    if alpha.getextrema() == (255, 255):
        return None
    with Image.open(io.BytesIO(result)) as retouched:
        if "A" in retouched.getbands():
            return None
        cutout = retouched.convert("RGBA")
    cutout.putalpha(alpha.resize(cutout.size, Image.Resampling.LANCZOS))
    fmt = result_format if result_format in WITH_ALPHA else "PNG"
    buffer = io.BytesIO()
    cutout.save(buffer, fmt, quality=quality)
    return buffer.getvalue(), fmt
