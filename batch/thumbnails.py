"""Small previews for the morning report, made once and kept beside the ledger.

A thumbnail is named by the content it shows (the SHA-256 of a source, or of a saved
output), so copies share one and a re-run never makes it again. Each is made from pixels a
check decoded anyway: the source's from the upload's (or its copy's), the result's from the
download's. The report makes any that are missing.
A thumbnail is a convenience: failing to make one never fails a download.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from batch.names import STATE_DIR
from batch.outputs import out_folder_there, remove_quietly

log = logging.getLogger("batch.thumbnails")

#: Longest side in pixels: sharp at the report's 160 CSS pixels on a high-density screen.
SIZE = 240
QUALITY = 72
FOLDER = Path(STATE_DIR) / "thumbs"


def path_for(out_dir: Path, sha256: str) -> Path:
    return out_dir / FOLDER / sha256[:2] / f"{sha256}.jpg"


def render(image_bytes: bytes) -> bytes:
    """A JPEG preview of an image file; the JPEG decoder is asked for a reduced size."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        image.draft("RGB", (SIZE * 2, SIZE * 2))
        return render_image(image)


def render_image(image: Image.Image) -> bytes:
    """A JPEG preview of decoded pixels, turned upright as their EXIF says."""
    small = ImageOps.exif_transpose(image)
    if small.mode != "RGB":
        small = small.convert("RGB")
    small.thumbnail((SIZE, SIZE))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=QUALITY, optimize=True)
    return buffer.getvalue()


def save(out_dir: Path, sha256: str, image_bytes: bytes) -> Path | None:
    """Make and keep the preview of ``image_bytes`` unless it exists; None if it cannot be
    made."""
    return _made(out_dir, sha256, lambda: render(image_bytes))


def save_pixels(out_dir: Path, sha256: str, image: Image.Image) -> Path | None:
    """Make and keep the preview of pixels already decoded, unless it exists."""
    return _made(out_dir, sha256, lambda: render_image(image))


def _made(out_dir: Path, sha256: str, preview: Callable[[], bytes]) -> Path | None:
    target = path_for(out_dir, sha256)
    if target.exists():
        return target
    try:
        made = preview()
    except Exception as exc:  # a preview is a courtesy: no fault in it costs a saved result
        log.debug("No preview for %s: %s", sha256[:12], exc)
        return None
    return _write(out_dir, target, made)


def _write(out_dir: Path, target: Path, preview: bytes) -> Path | None:
    """Written whole or not at all (a temp file renamed), but not fsynced: a preview lost to
    a power cut is made again by the next report."""
    temp = None
    if not out_folder_there(out_dir):  # gone, it stays so: nothing made beneath its mount
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".thumb-", dir=target.parent)
        with os.fdopen(fd, "wb") as sink:
            sink.write(preview)
        os.replace(temp, target)
    except OSError as exc:
        log.debug("No preview at %s: %s", target.name[:12], exc)
        if temp is not None:  # a drive the system just made read-only refuses that too
            remove_quietly(Path(temp))
        return None
    return target


def ensure(out_dir: Path, sha256: str, image_file: Path) -> Path | None:
    """The preview of a file on disk, made now if it is missing."""
    target = path_for(out_dir, sha256)
    if target.exists():
        return target
    try:
        data = image_file.read_bytes()
    except OSError:
        return None
    return save(out_dir, sha256, data)
