"""The emulator's 'retouch': a real, visible skin smoothing and brightening done with Pillow."""

from __future__ import annotations

import io
from collections.abc import Collection

from PIL import Image, ImageChops, ImageEnhance, ImageFilter, ImageStat

SMOOTHING = ("smart_skin", "acne_removal", "spot_correction", "skin_smoothing", "pore_control",
             "wrinkle_reduction", "under_eye_correction", "scar_reduction")


def _grey(image: Image.Image) -> bool:
    """No colour to judge skin by (a black-and-white portrait): its chroma is flat."""
    _, cb, cr = ImageStat.Stat(image.convert("YCbCr")).extrema
    return all(abs(low - 128) <= 3 and abs(high - 128) <= 3 for low, high in (cb, cr))


def skin_mask(image: Image.Image) -> Image.Image:
    """Pixels whose chroma falls in the classic YCbCr skin range (Cb 77-127, Cr 133-173); in
    a grey picture, its mid-tones."""
    luma, cb, cr = image.convert("YCbCr").split()
    if _grey(image):
        return luma.point(lambda v: 255 if 60 <= v <= 220 else 0)
    cb_ok = cb.point(lambda v: 255 if 77 <= v <= 127 else 0)
    cr_ok = cr.point(lambda v: 255 if 133 <= v <= 173 else 0)
    return ImageChops.multiply(cb_ok, cr_ok)


def looks_like_a_portrait(image: Image.Image) -> bool:
    """Some skin in colour; in black and white, a picture rather than a flat frame."""
    small = image.convert("RGB")
    small.thumbnail((64, 64))
    if _grey(small):
        return ImageStat.Stat(small.convert("L")).stddev[0] > 12
    histogram = skin_mask(small).histogram()
    total = small.width * small.height
    return bool(total) and histogram[255] / total >= 0.005


def retouch(image: Image.Image, enabled: Collection[str], fmt: str) -> bytes:
    rgb = image.convert("RGB")
    # Skin, minus edges (eyes, lips, hairline), feathered: smoothing that keeps features sharp.
    edges = rgb.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 24 else 0)
    edges = edges.filter(ImageFilter.MaxFilter(5))
    mask = ImageChops.subtract(skin_mask(rgb), edges).filter(ImageFilter.GaussianBlur(1.5))
    out = rgb
    strength = sum(1 for name in SMOOTHING if name in enabled)
    if strength:
        radius = max(1.0, min(rgb.width, rgb.height) / 500) * (1 + strength / 4)
        mask = mask.point(lambda v: v * 3 // 4)
        out = Image.composite(rgb.filter(ImageFilter.GaussianBlur(radius)), out, mask)
    if "skin_brightening" in enabled or "smart_skin" in enabled:
        out = Image.composite(ImageEnhance.Brightness(out).enhance(1.08), out, mask)
    buffer = io.BytesIO()
    if fmt == "PNG":
        out.save(buffer, "PNG")
    elif fmt == "WEBP":
        out.save(buffer, "WEBP", quality=90)
    else:
        out.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()
