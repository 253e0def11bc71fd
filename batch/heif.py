"""HEIC/HEIF support: Pillow's opener from the optional pillow-heif, registered on first use."""

from __future__ import annotations

import functools

HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc")


def unsupported(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first 12 bytes) is a HEIC/HEIF photo this
    installation cannot open (the optional support is missing)."""
    return head[4:12] in HEIF_BRANDS and not heif_support()


@functools.cache
def heif_support() -> bool:
    """Pillow's HEIC/HEIF opener, registered when the first such file comes (it takes longer
    to import than the rest of the start-up's image code)."""
    try:
        from pillow_heif import register_heif_opener  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    register_heif_opener()
    return True
