"""Carrying the source's metadata (EXIF, XMP, IPTC, ICC profile) onto the retouched result.

For a JPEG or WEBP result the metadata is spliced into the container (JPEG segments, RIFF
chunks), so the result's pixels are never re-encoded; a PNG result is re-encoded losslessly.
The copied EXIF says Orientation 1: uploads are sent upright, so results come back upright.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, PngImagePlugin
from PIL.ExifTags import Base

from batch.heif import HEIF_BRANDS, heif_support

SOS, EOI = 0xDA, 0xD9
APP1, APP2, APP13 = 0xE1, 0xE2, 0xED
EXIF_HEADER = b"Exif\x00\x00"
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
#: The rest of an XMP packet too big for one segment (Lightroom's and Photoshop's history).
XMP_EXTENSION_HEADER = b"http://ns.adobe.com/xmp/extension/\x00"
ICC_HEADER = b"ICC_PROFILE\x00"
IPTC_HEADER = b"Photoshop 3.0\x00"
ORIENTATION = 0x0112
#: The metadata :func:`carry` puts on a PNG, as Pillow reads it back: a PNG holding any of it
#: is saved again without, for a source that has none.
PNG_METADATA = frozenset({"exif", "xmp", "XML:com.adobe.xmp", "icc_profile"})
MAX_SEGMENT = 65533
#: The tags of a TIFF's first directory that describe the photo (what a JPEG's EXIF holds:
#: camera, date, author, copyright, rating, the EXIF and GPS directories). The rest describe
#: the TIFF file itself (strips, compression, bit depth) or are blobs carried otherwise or not
#: at all (XMP, IPTC, ICC, Photoshop's layers), which would make the EXIF of a JPEG result
#: lie about it or outgrow its 64 KB segment.
TIFF_TAGS_CARRIED = frozenset(int(tag) for tag in (
    Base.ImageDescription, Base.Make, Base.Model, Base.Orientation, Base.XResolution,
    Base.YResolution, Base.ResolutionUnit, Base.Software, Base.DateTime, Base.Artist,
    Base.HostComputer, Base.Rating, Base.RatingPercent, Base.Copyright, Base.ExifOffset,
    Base.GPSInfo, Base.XPTitle, Base.XPComment, Base.XPAuthor, Base.XPKeywords, Base.XPSubject))


def jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes, int, int]]:
    """(marker, payload, start, end) for each segment before the image data."""
    if data[:2] != b"\xff\xd8":
        return
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker in (SOS, EOI):
            return
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        yield marker, data[pos + 4 : pos + 2 + length], pos, pos + 2 + length
        pos += 2 + length


#: In a scan's entropy-coded data, the next marker: 0xFF followed by anything but a stuffed
#: 0x00, a restart marker or another 0xFF (fill).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


#: What may stand between the scans of a progressive image: tables, restart interval, the
#: next scan, comments and APPn segments.
_BETWEEN_SCANS = frozenset({0xC4, 0xDB, 0xDC, 0xDD, SOS, 0xFE, *range(0xE0, 0xF0)})


def jpeg_end(data: bytes) -> int | None:
    """Where a JPEG's (first) image ends, just past its EOI marker; None where that is not
    sure (a truncated file, a marker out of place). What follows is no part of it: a
    camera's preview, a phone's depth map or motion photo video."""
    pos, scanned = 2 if data[:2] == b"\xff\xd8" else len(data), False
    while pos + 2 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == EOI:
            return pos + 2 if scanned else None
        if scanned and marker != 0xFF and marker not in _BETWEEN_SCANS:
            return None
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 1 if marker == 0xFF else 2
            continue
        if pos + 4 > len(data):
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == SOS:
            scanned = True
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return None
            pos = found.start()
    return None


def _is_metadata(marker: int, payload: bytes) -> bool:
    return ((marker == APP1 and payload.startswith((EXIF_HEADER, XMP_HEADER,
                                                     XMP_EXTENSION_HEADER)))
            or (marker == APP2 and payload.startswith(ICC_HEADER))
            or (marker == APP13 and payload.startswith(IPTC_HEADER)))


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def upright_exif(exif_payload: bytes) -> bytes:
    """The EXIF block with Orientation reset to 1 (the pixels are already upright)."""
    exif = Image.Exif()
    exif.load(exif_payload)
    if exif.get(ORIENTATION, 1) != 1:
        exif[ORIENTATION] = 1
    return exif.tobytes()


def icc_segments(icc: bytes) -> list[bytes]:
    size = MAX_SEGMENT - len(ICC_HEADER) - 2
    chunks = [icc[i : i + size] for i in range(0, len(icc), size)] or [b""]
    return [_segment(APP2, ICC_HEADER + bytes([n + 1, len(chunks)]) + chunk)
            for n, chunk in enumerate(chunks)]


def source_segments(source: bytes) -> list[bytes]:
    """The metadata segments to carry onto a JPEG: a JPEG source's are copied raw (IPTC too),
    any other source's are built from what Pillow reads of it."""
    if source[:2] != b"\xff\xd8":
        return SourceMetadata.read(source).jpeg_segments()
    found = []
    for marker, payload, _, _ in jpeg_segments(source):
        if not _is_metadata(marker, payload):
            continue
        if payload.startswith(EXIF_HEADER):
            payload = upright_exif(payload)
        found.append(_segment(marker, payload))
    return found


def splice_jpeg(result: bytes, segments: list[bytes]) -> bytes:
    """``result`` with its own metadata segments replaced by ``segments`` (after JFIF)."""
    kept, insert_at = [], 2
    for marker, payload, start, end in jpeg_segments(result):
        if _is_metadata(marker, payload):
            continue
        if marker == 0xE0 and start == 2:
            insert_at = end
        kept.append((start, end))
    head = result[:insert_at]
    body_start = max((end for _, end in kept), default=insert_at)
    others = b"".join(result[s:e] for s, e in kept if s >= insert_at)
    return head + b"".join(segments) + others + result[body_start:]


def upright_size(source: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(source)) as image:
        width, height = image.size
        if image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):
            return height, width
        return width, height


def carry(source: bytes, result: bytes, result_format: str, *, upscale: bool = False,
          jpeg_quality: int = 92) -> bytes:
    """The result with the source's metadata in place of its own (none where the source has
    none: a copy whose location was taken out gets no other copy's back) and, if
    ``upscale``, scaled back to the source's (upright) dimensions when it came back smaller
    (a resized upload)."""
    if source[4:12] in HEIF_BRANDS:
        heif_support()
    size = upright_size(source) if upscale else None
    if size is not None:
        with Image.open(io.BytesIO(result)) as image:
            if image.size != size:
                buffer = io.BytesIO()
                scaled = image.resize(size, Image.Resampling.LANCZOS)
                scaled.save(buffer, result_format, quality=jpeg_quality)
                result = buffer.getvalue()
    if result_format == "JPEG":
        return splice_jpeg(result, source_segments(source))
    found = SourceMetadata.read(source)
    if result_format == "WEBP":
        return splice_webp(result, found)
    if result_format == "PNG":
        with Image.open(io.BytesIO(result)) as image:
            if not found and not PNG_METADATA & set(image.info):
                return result
            buffer = io.BytesIO()
            info = PngImagePlugin.PngInfo()
            if found.xmp:
                info.add_itxt("XML:com.adobe.xmp", found.xmp.decode("utf-8", "replace"))
            image.save(buffer, "PNG", exif=found.exif, icc_profile=found.icc, pnginfo=info)
            return buffer.getvalue()
    return result


@dataclass(frozen=True)
class SourceMetadata:
    """The source's metadata as Pillow reads it: EXIF (with its "Exif" header, Orientation
    reset to 1), XMP and the ICC profile, each empty when absent; and a TIFF's IPTC records,
    which only a JPEG result carries (the XMP of a PNG or WEBP holds what they say)."""

    exif: bytes
    xmp: bytes
    icc: bytes
    iptc: bytes = b""

    @classmethod
    def read(cls, source: bytes) -> SourceMetadata:
        iptc = b""
        with Image.open(io.BytesIO(source)) as image:
            exif = image.getexif()
            if image.format == "TIFF":
                for tag in set(exif) - TIFF_TAGS_CARRIED:
                    del exif[tag]
                iptc = tiff_iptc(source)
            xmp = image.info.get("xmp") or b""
            icc = image.info.get("icc_profile") or b""
        if isinstance(xmp, str):
            xmp = xmp.encode()
        return cls(upright_exif(exif.tobytes()) if len(exif) else b"", bytes(xmp), bytes(icc),
                   iptc)

    def __bool__(self) -> bool:
        return bool(self.exif or self.xmp or self.icc)

    def jpeg_segments(self) -> list[bytes]:
        """The JPEG segments of what fits one: an EXIF, XMP or IPTC block larger than a
        segment is left off (the result is saved without it rather than not at all)."""
        segments = [_segment(APP1, self.exif)] if 0 < len(self.exif) <= MAX_SEGMENT else []
        xmp = self.xmp
        if len(xmp) + len(XMP_HEADER) > MAX_SEGMENT:
            xmp = without_history(xmp)
        if xmp and len(xmp) + len(XMP_HEADER) <= MAX_SEGMENT:
            segments.append(_segment(APP1, XMP_HEADER + xmp))
        if self.iptc and len(resource := photoshop_iptc(self.iptc)) <= MAX_SEGMENT:
            segments.append(_segment(APP13, resource))
        return segments + (icc_segments(self.icc) if self.icc else [])


#: What makes a master's XMP outgrow a JPEG segment: the editing history Lightroom and
#: Photoshop keep (every step, every document placed in it), none of it about the photo;
#: and the packet's padding of spaces, room for edits in place.
_HISTORY = re.compile(rb"<(xmpMM:History|photoshop:DocumentAncestors)\b[^>]*?(?:/>|>.*?</\1>)",
                      re.DOTALL)
_PADDING = re.compile(rb"\s{64,}(?=<\?xpacket end)")


def without_history(xmp: bytes) -> bytes:
    """The XMP without its editing history and padding: what a JPEG segment may still hold of
    a long one, its rights, caption and keywords kept."""
    return _PADDING.sub(b"\n", _HISTORY.sub(b"", xmp))


#: A TIFF's IPTC-NAA tag: Photoshop writes the IIM records there typed as 32-bit integers,
#: of which Pillow reads only the first, so the tag is read from the file itself.
IPTC_TAG = 33723
_IPTC_TYPES = {1: 1, 4: 4, 7: 1}  # BYTE, LONG, UNDEFINED: bytes per value


def tiff_iptc(source: bytes) -> bytes:
    """The IPTC records of a TIFF's first directory, as stored (empty where there are none,
    and for a BigTIFF, whose masters are rare)."""
    order = {b"II": "<", b"MM": ">"}.get(source[:2])
    try:
        if order is None or struct.unpack_from(order + "H", source, 2)[0] != 42:
            return b""
        (directory,) = struct.unpack_from(order + "I", source, 4)
        (entries,) = struct.unpack_from(order + "H", source, directory)
        for n in range(entries):
            tag, kind, count, value = struct.unpack_from(order + "HHI4s", source,
                                                         directory + 2 + 12 * n)
            if tag == IPTC_TAG and kind in _IPTC_TYPES:
                size = count * _IPTC_TYPES[kind]
                if size <= 4:
                    return bytes(value[:size])
                (offset,) = struct.unpack(order + "I", value)
                return source[offset:offset + size]
    except struct.error:  # a directory past the end of a damaged file
        pass
    return b""


def photoshop_iptc(records: bytes) -> bytes:
    """A JPEG's APP13 payload holding IPTC records: Photoshop's image resource 0x0404."""
    padding = b"\x00" if len(records) & 1 else b""
    return (IPTC_HEADER + b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(records)) + records
            + padding)


def riff_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    pos = 12
    while pos + 8 <= len(data):
        fourcc = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        yield fourcc, data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)


def riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    padding = b"\x00" if len(payload) & 1 else b""
    return fourcc + struct.pack("<I", len(payload)) + payload + padding


def splice_webp(result: bytes, meta: SourceMetadata) -> bytes:
    """``result`` (a WEBP) with the source's ICC, EXIF and XMP, in place of its own, as RIFF
    chunks in the extended (VP8X) layout the WebP container spec orders them in; the image
    chunks are kept as they are."""
    if result[:4] != b"RIFF" or result[8:12] != b"WEBP":
        return result
    chunks = [(c, p) for c, p in riff_chunks(result) if c not in (b"VP8X", b"ICCP", b"EXIF",
                                                                   b"XMP ")]
    if not meta and not any(c in (b"ICCP", b"EXIF", b"XMP ") for c, _ in riff_chunks(result)):
        return result
    if any(c in (b"ANIM", b"ANMF") for c, _ in chunks):
        return result
    with Image.open(io.BytesIO(result)) as image:
        width, height = image.size
        alpha = image.mode in ("RGBA", "LA") or "transparency" in image.info
    flags = ((0x20 if meta.icc else 0) | (0x10 if alpha else 0) | (0x08 if meta.exif else 0)
             | (0x04 if meta.xmp else 0))
    vp8x = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (
        height - 1).to_bytes(3, "little")
    exif = meta.exif[len(EXIF_HEADER):] if meta.exif.startswith(EXIF_HEADER) else meta.exif
    body = riff_chunk(b"VP8X", vp8x)
    if meta.icc:
        body += riff_chunk(b"ICCP", meta.icc)
    body += b"".join(riff_chunk(c, p) for c, p in chunks)
    if exif:
        body += riff_chunk(b"EXIF", exif)
    if meta.xmp:
        body += riff_chunk(b"XMP ", meta.xmp)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body
