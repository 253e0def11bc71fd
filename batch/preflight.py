"""Deciding, before any credit is spent, whether a file can be sent as it is."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import BinaryIO, NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import _imaging as pillow_core

from batch.apispec import ACCEPTED_FORMATS, MAX_SIDE_EXCLUSIVE, MAX_UPLOAD_BYTES
from batch.heif import unsupported as heif_unsupported
from batch.stripping import describe, held, strip, strippable, stripped_pieces
from batch.thumbnails import SIZE as PREVIEW_SIDE

#: Anything larger than a 100-megapixel frame is refused before it is decoded (bomb guard).
MAX_PIXELS = 100_000_000
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
SENDABLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "PA", "1"})
#: 16-bit grey, as a black-and-white export is saved: sent as an 8-bit copy of its top bytes.
SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
#: 32-bit pixels (integer, floating-point): no scale to 8 bits can be known from the file.
WIDE_MODES = {"I": "32-bit integer", "F": "32-bit floating-point"}
TIFF_MAGIC = (b"II*\0", b"MM\0*")


@dataclass(frozen=True, slots=True)
class PrepareSettings:
    """How files outside the API's limits are handled (config keys of the same names)."""

    #: "resize": bring them within limits on a copy; "reject": refuse them with a reason.
    fit: str = "resize"
    #: The longest side of a resized upload (each side must stay under 4096).
    max_side: int = 4095
    jpeg_quality: int = 92
    #: Remove the metadata before upload (see ``batch.stripping``): "strip" or "keep".
    upload_metadata: str = "strip"


CONVERTIBLE = frozenset({"TIFF", "HEIF", "MPO"})

#: Files prepared at once (a run's uploads, a dry run's verdicts): a copy is decoded, resized
#: and encoded on one core, so one per core keeps the CPU busy, and at least two, so that a
#: file read slowly (a network share) does not idle it; capped because each holds a camera
#: file's pixels while it is made (some 200 MB at 24 megapixels).
COPIES_AT_ONCE = max(2, min(os.cpu_count() or 1, 8))

#: Pillow's freed pixel blocks (16 MB each) kept for reuse, per copy made at once: a
#: 24-megapixel copy uses about ten, with its resized pixels.
BLOCKS_PER_COPY = 16


def reuse_pixel_memory(copies_at_once: int) -> None:
    """Let the next copy reuse the pixel memory the last one freed. Otherwise the kernel maps
    and zeroes some 150 MB afresh for every camera file, a tenth of the client's CPU when
    copies bound a run; what is kept is at most what the copies under way held at once.
    A ``PILLOW_BLOCKS_MAX`` the user set wins."""
    if "PILLOW_BLOCKS_MAX" not in os.environ:
        pillow_core.set_blocks_max(BLOCKS_PER_COPY * copies_at_once)


def release_pixel_memory() -> None:
    """Give the pixel memory back to the system once there is no photo to work on: a watch
    waiting for the next card would otherwise hold a few hundred MB of it for nothing, kept
    for reuse by Pillow and, once Pillow lets it go, by the C library's heaps."""
    pillow_core.clear_cache()
    if (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, where the C library has one (not on macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


#: The error code of a job rejected because its file could not be read (gone with a share that
#: went away, an I/O error, no permission): unlike a content that cannot be sent, the next
#: run reads it again (see ``batch.pipeline._pick_up_leftovers``).
UNREADABLE = "FILE_UNREADABLE"

#: The error code of a job none of whose files gives its key any more (edited since its scan,
#: or keyed by a rule this version reads otherwise): the next scan reads those files anew,
#: and each gets the job its bytes give now (see ``batch.requeue.read_again``).
CHANGED = "FILE_CHANGED"


#: Said of a HEIC photo while the optional support is missing: a file's problem, not its
#: content's, so the first run after it is installed sends the photo.
NO_HEIF = "HEIC/HEIF photo, but HEIC support is not installed (pip install 'skinbatch[heic]')"


class Rejected(Exception):
    """The file cannot be sent; ``reason`` says why in words a person understands, ``code``
    is :data:`UNREADABLE` when the file could not be read at all."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


@dataclass(frozen=True, slots=True)
class Prepared:
    payload: bytes
    format: str
    width: int
    height: int
    #: What was done to the file before upload, in words (None: sent byte for byte).
    note: str | None = None
    #: The metadata removed from it before upload, by kind ("EXIF, XMP 2"), or None.
    stripped: str | None = None
    #: The photo's pixels as the check or the copy decoded them, so that the report's preview
    #: of the source is made from them rather than by decoding the file again (the submitter
    #: takes them and lets them go).
    pixels: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def content_type(self) -> str:
        return MIME[self.format]


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


class Inspection(NamedTuple):
    format: str
    width: int
    height: int
    mode: str
    frames: int
    #: The EXIF Orientation tag (1 = upright, also when there is none).
    orientation: int


@contextmanager
def _decoding(missing_heif: bool = False, tiff: bool = False) -> Iterator[None]:
    """Decoding a file the API would be sent: any way it fails becomes a reason in words, and
    a frame larger than a decompression bomb's is refused rather than decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except Rejected:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise Rejected("the image claims more pixels than this tool will decode: a corrupt "
                           f"file or a decompression bomb ({exc})") from exc
        except UnidentifiedImageError as exc:
            if missing_heif:
                raise Rejected(NO_HEIF) from exc
            if tiff:
                raise Rejected("a TIFF this tool cannot decode (floating-point colour, or a "
                               "layout Pillow does not read); export it as an 8- or 16-bit "
                               "TIFF or a JPEG") from exc
            raise Rejected("not an image (the content is not JPEG, PNG or WEBP)") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the disk's (a share gone: EIO), not the image's: read it again later
            raise Rejected(f"the image is damaged or truncated and cannot be decoded ({exc})") \
                from exc


def inspect_image(data: bytes | BinaryIO) -> Inspection:
    """Say what ``data`` (the bytes, or the open file) is, from its header."""
    return _inspected(data, lambda _: False)[0]


def decoded(data: bytes) -> tuple[Inspection, Image.Image]:
    """What ``data`` is, and its pixels: decoded (bounded: a JPEG at an eighth of its size, or
    a preview's if more, which still reads every byte), so a damaged file is found now and its
    preview needs no decode of its own."""
    inspection, pixels = _inspected(data, lambda _: True, keep=True)
    assert pixels is not None
    return inspection, pixels


def _inspected(data: bytes | BinaryIO, decode: Callable[[Inspection], bool],
               keep: bool = False) -> tuple[Inspection, Image.Image | None]:
    """What ``data`` is and, where ``decode`` says so of what it is (or raises
    :class:`Rejected`), its pixels decoded from the same opening, kept if asked (``keep``)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    source.seek(0)
    head = source.read(12)
    source.seek(0)
    if not head:
        raise Rejected("the file is empty")
    missing_heif = heif_unsupported(head)
    with _decoding(missing_heif, head[:4] in TIFF_MAGIC), Image.open(source) as image:
        fmt = image.format or "unknown"
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise Rejected(
                f"the image claims {width}x{height} pixels, more than the "
                f"{MAX_PIXELS // 1_000_000} megapixels this tool will decode "
                "(a corrupt file or a decompression bomb)"
            )
        orientation = image.getexif().get(0x0112, 1)
        inspection = Inspection(fmt, width, height, image.mode, getattr(image, "n_frames", 1),
                                orientation if isinstance(orientation, int) else 1)
        if not decode(inspection):
            return inspection, None
        if fmt == "JPEG":
            image.draft("RGB", (max(1, width // 8, min(width, PREVIEW_SIDE)),
                                max(1, height // 8, min(height, PREVIEW_SIDE))))
        image.load()
        return inspection, image if keep else None


def preflight(data: bytes, settings: PrepareSettings = PrepareSettings()) -> Prepared:
    """Check ``data`` against everything the API would refuse; return what to send.

    A file within the limits, upright and in an accepted format goes byte for byte (less its
    metadata). Otherwise (``fit = "resize"``) a copy is made: EXIF orientation applied, scaled
    to ``max_side``, re-encoded as JPEG until it fits, and the note says what was done. Either
    way the file is decoded once here: a copy's full decode is its check.
    """
    inspection, pixels = _checked(data, settings, len(data), keep=True)
    fmt, width, height, _, _, orientation = inspection
    if not needs_copy(inspection, len(data)):
        return _stripped(Prepared(data, fmt, width, height, pixels=pixels), settings)
    with _decoding():
        resized = _resized(data, fmt, width, height, orientation, settings)
    # A copy carries the ICC profile and what the encoder copies over (the comment), taken off
    # here; its record is what the photo held, which stays behind whatever the setting.
    return replace(_stripped(resized, settings), stripped=describe(held(data, fmt)) or None)


def photo_key(data: bytes, by_image: bool, inspection: Inspection | None = None) -> str:
    """A photo's key in a ledger: its :func:`identity_digest`, or in a ledger that keys by
    whole files (``by_image`` False, see ``Ledger.image_identity``) its file's hash."""
    return identity_digest(data, inspection) if by_image else hashlib.sha256(data).hexdigest()


def identity_digest(data: bytes, inspection: Inspection | None = None) -> str:
    """What a photo is, for the ledger (a job per photo and options): the hash of the bytes
    its upload is made from, less the metadata uploads go without (:func:`strip`), and, for
    one sent as a copy, that it is and which way it is turned. A caption, keyword or rating
    written into a delivered photo leaves it the photo that was paid for; edited pixels make
    a new one. A TIFF or HEIC (always a copy, from every byte of it) is its whole file."""
    if inspection is None:
        if not strippable(data[:12]):
            return hashlib.sha256(data).hexdigest()
        try:
            inspection = inspect_image(data)
        except Rejected:
            return hashlib.sha256(data).hexdigest()
    if inspection.format not in ACCEPTED_FORMATS:
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    for piece in stripped_pieces(data, inspection.format):
        digest.update(piece)
    if needs_copy(inspection, len(data)):
        digest.update(f"\0a copy, orientation {inspection.orientation}".encode())
    return digest.hexdigest()


def needs_copy(inspection: Inspection, size: int) -> bool:
    """The file cannot go as it is: too big, not upright, 16 bits deep, or in a format the
    API refuses."""
    fmt, width, height, mode, _, orientation = inspection
    return (size > MAX_UPLOAD_BYTES or width >= MAX_SIDE_EXCLUSIVE
            or height >= MAX_SIDE_EXCLUSIVE or orientation != 1 or fmt not in ACCEPTED_FORMATS
            or sixteen_bit_grey(fmt, mode))


def sixteen_bit_grey(fmt: str, mode: str) -> bool:
    """A PNG holds at most 16 bits a channel: one that Pillow opens as 32-bit "I" is 16-bit
    grey too."""
    return mode in SIXTEEN_BIT_GREY or (mode == "I" and fmt == "PNG")


def check(data: bytes | BinaryIO, settings: PrepareSettings = PrepareSettings(),
          size: int = 0) -> Inspection:
    """The verdict alone, without preparing the upload: what the file is, or ``Rejected``
    with the reason. The scan asks this of every new file, so a file that cannot be sent is
    rejected (and left out of the credit estimate) before anything is paid for. A file sent as
    it is gets decoded here; one that needs a copy does not, as decoding it for the copy is
    its check (still before its upload), and a camera file costs a second decode otherwise.
    ``data`` may be the open file (of ``size`` bytes), for one that is only looked at here."""
    size = len(data) if isinstance(data, bytes) else size
    return _checked(data, settings, size)[0]


def _checked(data: bytes | BinaryIO, settings: PrepareSettings, size: int, keep: bool = False
             ) -> tuple[Inspection, Image.Image | None]:
    return _inspected(data, lambda inspection: _sendable(inspection, settings, size), keep)


def _sendable(inspection: Inspection, settings: PrepareSettings, size: int) -> bool:
    """Whether the file goes as it is (True) or as a copy; raises ``Rejected`` if neither."""
    fmt, width, height, mode, frames, _ = inspection
    if fmt not in ACCEPTED_FORMATS and fmt not in CONVERTIBLE:
        raise Rejected(f"{fmt} images are not accepted by the API (only JPEG, PNG and WEBP; "
                       "TIFF and HEIC are converted)")
    if frames > 1 and fmt != "MPO":
        raise Rejected(f"animated image with {frames} frames; the API retouches still photos")
    if mode == "CMYK":
        raise Rejected("CMYK colour image; the API needs RGB (convert it to RGB first)")
    if mode in WIDE_MODES and not sixteen_bit_grey(fmt, mode):
        raise Rejected(f"{WIDE_MODES[mode]} pixels (high dynamic range): the tool cannot tell "
                       "how to bring them to 8 bits; export it as an 8- or 16-bit image")
    if mode not in SENDABLE_MODES and not sixteen_bit_grey(fmt, mode) and fmt not in CONVERTIBLE:
        raise Rejected(f"unsupported pixel format {mode}; save it as an 8-bit RGB image")
    if settings.fit == "reject":
        if size > MAX_UPLOAD_BYTES:
            raise Rejected(f"the file is {_mb(size)}, over the API's 10 MB limit")
        if width >= MAX_SIDE_EXCLUSIVE or height >= MAX_SIDE_EXCLUSIVE:
            raise Rejected(f"the image is {width}x{height} px; the API needs each side under "
                           f"{MAX_SIDE_EXCLUSIVE} px")
    return not needs_copy(inspection, size)


def _stripped(prepared: Prepared, settings: PrepareSettings) -> Prepared:
    if settings.upload_metadata == "keep":
        return prepared
    payload, removed = strip(prepared.payload, prepared.format)
    return replace(prepared, payload=payload, stripped=describe(removed) or None)


def _resized(data: bytes, fmt: str, width: int, height: int, orientation: int,
             settings: PrepareSettings) -> Prepared:
    side = min(settings.max_side, MAX_SIDE_EXCLUSIVE - 1)
    with Image.open(io.BytesIO(data)) as source:
        if source.format == "JPEG":
            source.draft("RGB", (side, side))
        # Turned in place: an upright photo (most) is not copied, 100 MB at 24 megapixels.
        ImageOps.exif_transpose(source, in_place=True)
        image: Image.Image = source
        sixteen_bit = sixteen_bit_grey(fmt, image.mode)
        if sixteen_bit:
            # By its top byte, as an export to 8 bits does (convert() would clip every value
            # over 255, and the photo would go as a white frame).
            image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        elif image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        if max(image.size) > side:
            # Bicubic, not Lanczos: on camera files the two differ by far less than the JPEG
            # encode that follows loses, and bicubic costs clearly less CPU (README,
            # Performance).
            image = ImageOps.contain(image, (side, side), Image.Resampling.BICUBIC)
        quality = settings.jpeg_quality
        while True:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality, icc_profile=source.info.get("icc_profile"))
            payload = buffer.getvalue()
            if len(payload) <= MAX_UPLOAD_BYTES or quality <= 40:
                break
            quality -= 8
        if image is source:  # the pixels outlive the file they were read from
            image = source.copy()
    if len(payload) > MAX_UPLOAD_BYTES:
        raise Rejected("could not bring the file under the API's 10 MB limit")
    done = []
    if fmt not in ACCEPTED_FORMATS:
        done.append(f"converted from {fmt}")
    if sixteen_bit:
        done.append("16-bit grey brought to 8 bits")
    if orientation != 1:
        done.append(f"EXIF orientation {orientation} applied")
    if image.size != (width, height) and max(image.size) < max(width, height):
        done.append(f"resized from {width}x{height} ({_mb(len(data))}) to "
                    f"{image.width}x{image.height} ({_mb(len(payload))}, JPEG quality {quality})")
    return Prepared(payload, "JPEG", image.width, image.height, "; ".join(done) or "re-encoded",
                    pixels=image)
