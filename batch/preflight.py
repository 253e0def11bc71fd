"""Deciding, before any credit is spent, whether a file can be sent as it is."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from batch.apispec import ACCEPTED_FORMATS, MAX_SIDE_EXCLUSIVE, MAX_UPLOAD_BYTES

#: Anything larger than a 100-megapixel frame is refused before it is decoded (bomb guard).
MAX_PIXELS = 100_000_000
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
SENDABLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "PA", "1"})


class Rejected(Exception):
    """The file cannot be sent; ``reason`` says why in words a person understands."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Prepared:
    payload: bytes
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return MIME[self.format]


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def inspect_image(data: bytes) -> tuple[str, int, int, str, int]:
    """Decode ``data`` fully (bounded) and return (format, width, height, mode, frames)."""
    if not data:
        raise Rejected("the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or "unknown"
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise Rejected(
                        f"the image claims {width}x{height} pixels, more than the "
                        f"{MAX_PIXELS // 1_000_000} megapixels this tool will decode "
                        "(a corrupt file or a decompression bomb)"
                    )
                frames = getattr(image, "n_frames", 1)
                mode = image.mode
                if fmt == "JPEG":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
        except Rejected:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise Rejected("the image claims more pixels than this tool will decode: a corrupt "
                           f"file or a decompression bomb ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise Rejected("not an image (the content is not JPEG, PNG or WEBP)") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Rejected(f"the image is damaged or truncated and cannot be decoded ({exc})") \
                from exc
    return fmt, width, height, mode, frames


def preflight(data: bytes) -> Prepared:
    """Check ``data`` against everything the API would refuse; return what to send."""
    fmt, width, height, mode, frames = inspect_image(data)
    if fmt not in ACCEPTED_FORMATS:
        raise Rejected(f"{fmt} images are not accepted by the API (only JPEG, PNG and WEBP)")
    if frames > 1:
        raise Rejected(f"animated image with {frames} frames; the API retouches still photos")
    if mode == "CMYK":
        raise Rejected("CMYK colour image; the API needs RGB (convert it to RGB first)")
    if mode not in SENDABLE_MODES:
        raise Rejected(f"unsupported pixel format {mode} (16-bit or high-dynamic-range); "
                       "save it as an 8-bit RGB image")
    if len(data) > MAX_UPLOAD_BYTES:
        raise Rejected(f"the file is {_mb(len(data))}, over the API's 10 MB limit")
    if width >= MAX_SIDE_EXCLUSIVE or height >= MAX_SIDE_EXCLUSIVE:
        raise Rejected(f"the image is {width}x{height} px; the API needs each side under "
                       f"{MAX_SIDE_EXCLUSIVE} px")
    return Prepared(data, fmt, width, height)
