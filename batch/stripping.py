"""What leaves the machine with an upload: the pixels and what decoding them needs, nothing else.

The API retouches pixels. A photo's metadata says far more than it needs: GPS coordinates,
camera serial numbers, owner and client names in EXIF, XMP and IPTC captions, comments. Before
upload they are removed without touching the image data (JPEG segments, PNG chunks, WEBP
chunks are dropped; the compressed pixels are kept byte for byte). What decoding needs stays:
the ICC profile, and the JPEG markers that describe the image. Orientation needs no EXIF: an
upload is always upright (preflight rotates any other). The result gets the source's metadata
back on the way in (:mod:`batch.metadata`).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator

from batch.metadata import (
    APP1,
    APP2,
    APP13,
    EXIF_HEADER,
    ICC_HEADER,
    SourceMetadata,
    jpeg_end,
    jpeg_segments,
    riff_chunk,
    riff_chunks,
)

#: JPEG markers the decoder needs besides the frame and scan: JFIF (APP0) and Adobe (APP14,
#: which says how to read the colour channels). Every other APPn and comment is metadata.
APP0, APP14, COM = 0xE0, 0xEE, 0xFE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Content credentials (C2PA) name the photo's author and its edits, by its own chunk.
PNG_METADATA = {b"tEXt": "text", b"zTXt": "text", b"iTXt": "text", b"eXIf": "EXIF",
                b"tIME": "time", b"caBX": "C2PA"}
WEBP_METADATA = {b"EXIF": "EXIF", b"XMP ": "XMP", b"C2PA": "C2PA"}


def strippable(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first 12 bytes) is of a kind :func:`strip`
    takes metadata out of: a JPEG, PNG or WEBP."""
    return head[:2] == b"\xff\xd8" or head.startswith(PNG_SIGNATURE) or _is_webp(head)


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


#: Kinds removed from uploads only since ledgers began keying photos by their image: a key
#: still counts them, so that a photo keyed before is not paid for again under a new key.
KEYED = frozenset({"C2PA"})


def strip(data: bytes, fmt: str, spare: frozenset[str] = frozenset()) -> tuple[bytes, Counter[str]]:
    """``data`` without its metadata (but the kinds in ``spare``), and what was removed (kind
    -> how many blocks)."""
    if fmt == "JPEG":
        return _strip_jpeg(data)
    if fmt == "PNG":
        return _strip_png(data, spare)
    if fmt == "WEBP":
        return _strip_webp(data, spare)
    return data, Counter()


def _jpeg_kind(marker: int, payload: bytes) -> str | None:
    """The kind of metadata a segment holds, or None for one the decoder needs."""
    if marker in (APP0, APP14) or (marker == APP2 and payload.startswith(ICC_HEADER)):
        return None
    if marker == APP1:
        return "EXIF" if payload.startswith(EXIF_HEADER) else "XMP"
    if marker == APP13:
        return "IPTC"
    if marker == COM:
        return "comment"
    if 0xE0 <= marker <= 0xEF:
        return "other"
    return None


def stripped_pieces(data: bytes, fmt: str) -> Iterator[bytes | memoryview]:
    """What a photo's key is made from, ``strip(data, fmt, KEYED)``'s bytes, in pieces, not
    joined: hashing a camera file's pieces does not copy it (nor hold the GIL for the copy)."""
    if fmt != "JPEG":
        yield strip(data, fmt, KEYED)[0]
        return
    view, done = memoryview(data), 0
    for start, end, _ in _jpeg_cuts(data):
        yield view[done:start]
        done = end
    yield view[done:]


def _jpeg_cuts(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(start, end, kind) of each metadata segment, in order."""
    for marker, payload, start, end in jpeg_segments(data):
        kind = _jpeg_kind(marker, payload)
        if kind is not None:
            yield start, end, kind


def _jpeg_removals(data: bytes) -> tuple[list[tuple[int, int]], Counter[str]]:
    """The spans of a JPEG its upload leaves out, in order, and their kinds: its metadata
    segments, and whatever is appended after the image (a motion photo's video and sound, a
    preview, a depth map). A photo's key keeps the latter (see :func:`stripped_pieces`), as
    keys were made so before."""
    spans, removed = [], Counter[str]()
    for start, end, kind in _jpeg_cuts(data):
        spans.append((start, end))
        removed[kind] += 1
    if (stop := jpeg_end(data) or len(data)) < len(data):
        spans.append((stop, len(data)))
        removed["appended"] += 1
    return spans, removed


def _strip_jpeg(data: bytes) -> tuple[bytes, Counter[str]]:
    spans, removed = _jpeg_removals(data)
    if not spans:
        return data, removed
    kept, done = [], 0
    for start, end in spans:
        kept.append(data[done:start])  # what came before it, byte for byte
        done = end
    return b"".join(kept) + data[done:], removed


def _strip_png(data: bytes, spare: frozenset[str]) -> tuple[bytes, Counter[str]]:
    removed: Counter[str] = Counter()
    if not data.startswith(PNG_SIGNATURE):
        return data, removed
    kept, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, end = data[pos + 4:pos + 8], pos + 12 + length
        name = PNG_METADATA.get(kind)
        if name == "text" and data[pos + 8:pos + 8 + 17] == b"XML:com.adobe.xmp":
            name = "XMP"
        if name is None or name in spare:
            kept.append(data[pos:end])
        else:
            removed[name] += 1
        pos = end
        if kind == b"IEND":
            break
    return (b"".join(kept), removed) if removed else (data, removed)


def _strip_webp(data: bytes, spare: frozenset[str]) -> tuple[bytes, Counter[str]]:
    removed: Counter[str] = Counter()
    if not _is_webp(data):
        return data, removed
    body = b""
    for fourcc, payload in riff_chunks(data):
        if fourcc in WEBP_METADATA and WEBP_METADATA[fourcc] not in spare:
            removed[WEBP_METADATA[fourcc]] += 1
            continue
        if fourcc == b"VP8X":  # its flags list the EXIF and XMP chunks present: clear both
            payload = bytes([payload[0] & ~0x0C]) + payload[1:]
        body += riff_chunk(fourcc, payload)
    if not removed:
        return data, removed
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body, removed


def held(data: bytes, fmt: str) -> Counter[str]:
    """The metadata a photo holds, by kind: what a copy made of its pixels (rotated, resized,
    converted) leaves behind, as the copy carries its ICC profile and nothing else."""
    if fmt in ("JPEG", "MPO"):  # MPO: a camera's JPEG with its preview or depth map after it
        return _jpeg_removals(data)[1]
    if strippable(data[:12]):
        return strip(data, fmt)[1]
    try:
        meta = SourceMetadata.read(data)  # a TIFF's descriptive tags, a HEIC's EXIF; their XMP
    except Exception:  # damaged tags: what a photo held is told, never a reason to refuse it
        return Counter()
    return Counter([kind for kind, there in (("EXIF", meta.exif), ("XMP", meta.xmp)) if there])


def describe(removed: Counter[str]) -> str:
    """How a job records what was removed from its upload: "EXIF, XMP 2"."""
    return ", ".join(f"{kind} {n}" if n > 1 else kind for kind, n in sorted(removed.items()))


def tally(described: str | None) -> Counter[str]:
    """What :func:`describe` wrote, as counts by kind again."""
    found: Counter[str] = Counter()
    for part in (described or "").split(", "):
        kind, _, n = part.partition(" ")
        if kind:
            found[kind] += int(n or 1)
    return found

