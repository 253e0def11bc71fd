"""Which file names are photos to take, and what their outputs are called."""

from __future__ import annotations

import codecs
import os
from pathlib import PurePosixPath

#: .jfif and .jpe are JPEG too (browsers on Windows save photos as .jfif).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".tif", ".tiff",
                            ".heic", ".heif"})
#: Camera RAW files: a shoot folder may hold only these, and they cannot be sent.
RAW_SUFFIXES = frozenset({".3fr", ".arw", ".cr2", ".cr3", ".dng", ".erf", ".iiq", ".nef",
                          ".nrw", ".orf", ".pef", ".raf", ".raw", ".rw2", ".srw"})
TEMP_SUFFIXES = (".part", ".tmp", ".temp", ".crdownload", ".partial", ".download", "~")
DEFAULT_NAMING = "{stem}{ext}"
#: The folder in an output folder that holds the run's own state (ledger, locks, previews).
STATE_DIR = ".skinbatch"
#: The longest file name (in bytes) the filesystems an output folder lives on take: ext4, XFS,
#: Btrfs, APFS, NTFS and SMB shares alike.
NAME_MAX = 255

IGNORED, IMAGE, OTHER = 0, 1, 2
#: Folders a NAS or an operating system keeps in a shared folder or at a drive's top: previews
#: (Synology's @eaDir holds several JPEG thumbnails of every photo beside it), recycle bins and
#: snapshots (culled photos, and copies of the shoot as it was), and fsck's lost+found (only
#: root may read it). Never the shoot, and every photo in them would be paid for. Compared
#: case-blind: Windows names its bin $Recycle.Bin on one drive and $RECYCLE.BIN on another.
SYSTEM_FOLDERS = frozenset(name.casefold() for name in (
    "@eaDir", "#recycle", "#snapshot",  # Synology
    "@Recycle", "@Recently-Snapshot",  # QNAP
    "$RECYCLE.BIN", "RECYCLER", "RECYCLED", "System Volume Information",  # Windows
    "lost+found"))
NOT_UTF8 = ("its path is not valid UTF-8 text (a name written in another system's encoding, "
            "shown with the odd bytes as \\x..): rename it to process it")


def is_utf8(text: str) -> bool:
    """A name on disk that is not valid UTF-8 reaches Python as lone surrogates, which neither
    ledger can store."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """A name that is not valid UTF-8, as text a ledger stores and a person reads."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _shown_on_write(error: UnicodeError) -> tuple[str, int]:
    """An encoding error handler that writes a name's odd bytes (lone surrogates) as
    :func:`shown` does, ``\\xfc``."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    odd = error.object[error.start:error.end]
    try:
        return shown(odd), error.end
    except UnicodeEncodeError:  # a surrogate no name's bytes make
        return odd.encode("utf-8", "backslashreplace").decode(), error.end


#: The error handler a terminal's stream takes (see ``batch.cli``).
SHOWN = "skinbatch-shown"
codecs.register_error(SHOWN, _shown_on_write)


def name_kind(name: str) -> int:
    """IGNORED for hidden, temporary and partial names (never taken until renamed), IMAGE for
    an image extension, else OTHER. One pass per name: it runs for every entry of every scan."""
    if name[:1] == "." or name[:2] == "~$":
        return IGNORED
    lower = name.lower()
    if lower.endswith(TEMP_SUFFIXES) or ".syncthing." in lower:
        return IGNORED
    dot = lower.rfind(".")
    return IMAGE if dot > 0 and lower[dot:] in IMAGE_SUFFIXES else OTHER


def folder_skipped(name: str) -> bool:
    """A folder the walk passes over in silence, as hidden: a temporary or hidden name, or
    one of :data:`SYSTEM_FOLDERS`. Given as a SOURCE of its own, it is walked."""
    return name_kind(name) == IGNORED or name.casefold() in SYSTEM_FOLDERS


def output_name(naming: str, name: str) -> str:
    """The output's file name for the source file ``name`` under a naming template."""
    if naming == DEFAULT_NAMING:
        return name
    path = PurePosixPath(name)
    return naming.format(stem=path.stem, ext=path.suffix, name=name)


def output_rel(out_prefix: str, rel_dir: str, naming: str, name: str) -> str:
    """Where the output of ``rel_dir/name`` goes, relative to ``--out``: derived from the
    source's relative path alone."""
    out_name = output_name(naming, name)
    rel = f"{rel_dir}/{out_name}" if rel_dir else out_name
    return f"{out_prefix}/{rel}" if out_prefix else rel
