"""Writing outputs: temp file in the target folder, fsync, atomic no-clobber rename.

Output paths come only from the input's relative path (planned at scan time); nothing the
server sends takes part in them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from batch.names import IMAGE_SUFFIXES, STATE_DIR

TEMP_MARKER = ".skinbatch-"
TEMP_SUFFIX = ".part"
#: This process's worker, in its temp files' names: when a worker dies, the one that takes its
#: jobs over removes its partial files from a shared output folder (see :func:`worker_tag`).
_temp_tag = ""
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg", ".jfif", ".jpe"), "PNG": (".png",),
                   "WEBP": (".webp",)}
#: Free space below which no upload starts: every result paid for and not saved yet needs its
#: room, and so does the ledger that records it (its write-ahead log alone may take 16 MB).
MIN_FREE = 64 * 1024 * 1024


#: The longest path, in bytes with its final NUL, Linux takes in a call (PATH_MAX).
PATH_MAX = 4096
#: The longest name of a temp file beside an output (see :func:`new_temp`): a dot, up to 80
#: bytes of the output's name, the marker, the worker's tag, mkstemp's eight random
#: characters, the suffix.
TEMP_NAME_MAX = 1 + 80 + len(TEMP_MARKER) + 9 + 8 + len(TEMP_SUFFIX)
#: Characters the disks studios deliver on refuse in a name: exFAT and FAT (USB drives and
#: cards), NTFS with Windows names, SMB shares from Windows.
WINDOWS_RESERVED = frozenset('<>:"\\|?*')


def name_refused(out_dir: Path, rel: str) -> str | None:
    """Why the disk of ``out_dir`` would not take the output ``rel``, asked before its photo
    is paid for: a path longer than PATH_MAX, or a name with a character such disks refuse
    (tried there: a file of that name made and removed in ``.skinbatch``, so the output's
    folders are not made before their photo is sent)."""
    folder, _, name = rel.encode().rpartition(b"/")
    length = len(os.fsencode(out_dir)) + 1 + (len(folder) + 1 if folder else 0) \
        + max(len(name), TEMP_NAME_MAX)
    if length >= PATH_MAX:
        return (f"saving its output takes a path of {length} bytes (the output's, or the temp "
                f"file's it is written through), more than a path may be ({PATH_MAX - 1}): "
                "choose a shorter --out, or shorter folder or file names")
    if (refused := folder_refused(out_dir, os.fsdecode(folder))) is not None:
        return refused
    if WINDOWS_RESERVED.isdisjoint(rel):
        return None
    scratch = out_dir / STATE_DIR
    for part in rel.split("/"):
        if WINDOWS_RESERVED.isdisjoint(part) or not scratch.is_dir():
            continue
        probe = scratch / part
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        except OSError as exc:
            if refuses_name(exc, scratch):
                return name_refusal(exc)
            continue
        remove_quietly(probe)
    return None


def folds_case(out_dir: Path) -> bool:
    """Whether the disk of ``out_dir`` takes IMG_1.JPG and img_1.jpg for one name (exFAT and
    FAT drives, macOS's disks, shares from Windows or a Mac): its state folder answers to
    another case."""
    state = out_dir / STATE_DIR
    return os.path.isdir(state) and os.path.isdir(out_dir / STATE_DIR.upper())


def refuses_name(exc: OSError, folder: Path) -> bool:
    """Whether making a file in ``folder`` failed for its name rather than its disk (full,
    read-only, gone): exFAT's FUSE driver answers a refused name with ENOENT, in a folder
    that is still there."""
    if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
        return True
    return exc.errno == errno.ENOENT and folder.is_dir()


def name_refusal(exc: OSError) -> str:
    return (f"the disk of --out does not take this name ({exc.strerror or exc}): rename the "
            "photo, or choose an --out on another disk")


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class OutputConflict(Exception):
    """A different file already stands at the output path and is not ours to replace."""


def free_space(folder: Path) -> int | None:
    """Bytes free on the disk that holds ``folder``, or will once it is made (its nearest
    existing parent's); None when that cannot be told."""
    for place in (folder, *folder.parents):
        try:
            return shutil.disk_usage(place).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


#: Where the machine lists the drives and shares it mounts.
MOUNT_TABLE = Path("/etc/fstab")


#: Where drives and shares are mounted by hand, by a script or by the desktop.
MOUNT_HOMES = (Path("/mnt"), Path("/media"), Path("/run/media"))


class Unmounted(NamedTuple):
    """A folder where a drive or share is mounted, with nothing mounted there now, and how
    that is known."""

    point: Path
    why: str
    #: What to do when the disk beneath is meant.
    otherwise: str = ""


def unmounted_mount_point(folder: Path) -> Unmounted | None:
    """The folder on ``folder``'s path where a drive or share belongs and nothing is mounted
    now (a share that failed to mount after a reboot, a drive not plugged in), or None. What
    is written there lands on the disk beneath, and is hidden once the drive is back: a new
    ledger there would pay again for every photo. Known from the mount table, or, for a
    drive mounted by hand or by a script, from its place: a folder right below /mnt or
    /media that is empty and mounts nothing, where no earlier run left a ledger either."""
    try:
        lines = MOUNT_TABLE.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    points = {fields[1].replace("\\040", " ") for fields in map(str.split, lines)
              if len(fields) >= 2 and not fields[0].startswith("#")}
    for place in (folder, *folder.parents):
        if str(place) in points:
            return None if os.path.ismount(place) else Unmounted(
                place, f"where {MOUNT_TABLE} mounts a drive or share")
        if place.parent in MOUNT_HOMES:
            try:
                empty = not os.path.ismount(place) and not os.listdir(place)
            except OSError:  # not there (the check of --out's parent says so) or unreadable
                return None
            return Unmounted(place, f"an empty folder in {place.parent}, where drives and "
                                    "shares are mounted",
                             f"; if the results are meant to be on the disk beneath, make a "
                             f"folder in {place} and give that") if empty else None
    return None


def out_folder_there(out_dir: Path) -> bool:
    """The output folder's own state folder, made at the run's start, tells that the folder
    is still there: a drive unplugged or a share unmounted leaves its mount point behind, an
    empty folder of another disk, and what is written there is hidden once the drive is back.
    (Not the folder's device: a drive plugged in again, or a share mounted again, may come
    back as another.) A dead share's errors (ENOTCONN, EIO) mean "not there" too."""
    return os.path.isdir(out_dir / STATE_DIR)


def short_of_room(folders: Iterable[Path], need: int = MIN_FREE) -> str | None:
    """Which of ``folders`` (the output folder, a ledger file's) lies on a disk with less
    than ``need`` bytes left, and how much it has; None when every one has room."""
    for folder in folders:
        free = free_space(folder)
        if free is not None and free < need:
            return (f"the disk of {folder} has {free / 2**20:.1f} MB free, less than the "
                    f"{need // 2**20} MB kept for the ledger and the results paid for")
    return None


def output_rel(planned: str, fmt: str, source: Path | None = None) -> str:
    """The planned relative path, with the suffix changed only if the result's format differs
    (a TIFF, a HEIC or a PNG sent as a copy comes back as JPEG): IMG_1.tif gives IMG_1.jpg,
    unless another photo in the folder of ``source`` (the file it was made from) has its stem
    (a master beside its export, an iPhone's HEIC beside its JPG, a TIFF beside a PNG): then
    IMG_1.tif.jpg, each its own output."""
    path = PurePosixPath(planned)
    suffixes = FORMAT_SUFFIXES.get(fmt)
    if suffixes is None or path.suffix.lower() in suffixes:
        return planned
    if source is not None and _stem_shared(source):
        return planned + suffixes[0]
    return str(path.with_suffix(suffixes[0]))


def _stem_shared(source: Path) -> bool:
    own = source.suffix.lower()
    return any(source.with_suffix(case(suffix)).exists()
               for suffix in IMAGE_SUFFIXES if suffix != own for case in (str.lower, str.upper))


#: Sources always sent as a JPEG copy, whose output takes a JPEG's name.
CONVERTED_SUFFIXES = frozenset({".tif", ".tiff", ".heic", ".heif"})


def folder_refused(out_dir: Path, rel_folder: str) -> str | None:
    """Why the output's folder under ``out_dir`` (which the run's start checked) would not take
    it: the nearest one of its folders that is there is a file, or this user may not write in
    it (another user's, a mount read-only)."""
    if not rel_folder:
        return None
    top = os.fspath(out_dir)
    folder = os.path.join(top, rel_folder)
    while folder != top:
        if os.path.isdir(folder):
            if os.access(folder, os.W_OK | os.X_OK):
                return None
            return (f"its output folder {folder} cannot be written by this user (another "
                    "user's, or read-only): not sent, as its result could not be saved there "
                    "(give this user write access to it, or choose another --out)")
        if os.path.lexists(folder):
            return (f"{folder} is a file where its output's folder would be: not sent, as its "
                    "result could not be saved there (move that file away)")
        folder = os.path.dirname(folder)
    return None


def taken_by_another(out_dir: Path, planned: str, source: Path, ours: str | None) -> Path | None:
    """A file at the output of ``source`` (planned at ``planned``; under a JPEG's name for a
    TIFF or HEIC) that skinbatch did not save for it (``ours``: where it did), or None."""
    names = {planned}
    if source.suffix.lower() in CONVERTED_SUFFIXES:
        names.add(output_rel(planned, "JPEG", source))
    for rel in sorted(names):
        if rel != ours and os.path.lexists(out_dir / rel):
            return out_dir / rel
    return None


def resolve_inside(out_dir: Path, rel: str) -> Path:
    target = (out_dir / rel).resolve()
    if not target.is_relative_to(out_dir.resolve()):
        raise OutputConflict(f"output path {rel!r} would fall outside the output folder")
    return target


def worker_tag(worker: str) -> str:
    return hashlib.sha256(worker.encode()).hexdigest()[:8]


def tag_temp_files(worker: str) -> None:
    """Name this process's temp files after its worker."""
    global _temp_tag
    _temp_tag = worker_tag(worker) + "-"


def new_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A temp file beside the output, named after it: cut to 80 bytes, not characters, so a
    name of 255 bytes in three-byte characters still leaves the temp name within NAME_MAX."""
    directory.mkdir(parents=True, exist_ok=True)
    short = name.encode()[:80].decode(errors="ignore")
    fd, path = tempfile.mkstemp(prefix=f".{short}{TEMP_MARKER}{_temp_tag}",
                                suffix=TEMP_SUFFIX, dir=directory)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, Path(path)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(data: bytes, directory: Path, name: str) -> Path:
    """``data`` in a new temp file beside the output ``name``, flushed to the disk (none
    left behind if it cannot be: a disk that fills up)."""
    fd, temp = new_temp(directory, name)
    try:
        with os.fdopen(fd, "wb") as sink:
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
    except BaseException:
        remove_quietly(temp)
        raise
    return temp


def copy_to_temp(source: Path, directory: Path, name: str) -> Path:
    fd, temp = new_temp(directory, name)
    with os.fdopen(fd, "wb") as sink, open(source, "rb") as src:
        shutil.copyfileobj(src, sink, 1024 * 1024)
        sink.flush()
        os.fsync(sink.fileno())
    return temp


def place(temp: Path, final: Path, sha256: str, previous_sha256: str | None,
          on_collision: str = "skip") -> Path:
    """Move a complete, fsynced ``temp`` to ``final`` atomically and return where it went.

    Identical content already there is left untouched; our own earlier output is replaced.
    Any other file there follows ``on_collision``: "skip" (refuse, the default), "suffix"
    (write ``name-1.ext``, ``name-2.ext``...) or "overwrite".
    """
    candidate = final
    for attempt in range(1, 1000):
        try:
            os.link(temp, candidate)
        except FileExistsError:
            if candidate.is_symlink() or not candidate.is_file():
                raise OutputConflict(f"{candidate} exists and is not a regular file") from None
            existing = sha256_file(candidate)
            if existing == sha256:
                return candidate
            ours = previous_sha256 is not None and existing == previous_sha256
            if ours or on_collision == "overwrite":
                os.replace(temp, candidate)
            elif on_collision == "suffix":
                candidate = final.with_name(f"{final.stem}-{attempt}{final.suffix}")
                continue
            else:
                raise OutputConflict(
                    f"a different file already exists at {candidate}; it was not overwritten "
                    "(move it away, or set on_collision)") from None
        except OSError as exc:
            if exc.errno not in (1, 38, 95):  # EPERM, ENOSYS, EOPNOTSUPP: no hard links here
                raise
            if candidate.exists() and on_collision != "overwrite":
                raise OutputConflict(f"a file already exists at {candidate}; not overwritten") \
                    from None
            os.replace(temp, candidate)
        fsync_dir(candidate.parent)
        return candidate
    raise OutputConflict(f"no free name next to {final}")


def remove_quietly(path: Path) -> bool:
    """Remove a temp or probe file, if it can be; whether it is gone. One on a drive or share
    that just went away (ENOTCONN, EIO) stays, for a later try: its removal must not stop the
    run."""
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def clean_temp_files(out_dir: Path, worker: str | None = None) -> int:
    """Remove partial files a killed run left behind (only our own temp names); with
    ``worker``, only that worker's."""
    marker = TEMP_MARKER + (worker_tag(worker) + "-" if worker is not None else "")
    removed = 0
    if not out_dir.is_dir():
        return 0
    for directory, dirnames, filenames in os.walk(out_dir):
        dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        for name in filenames:
            if marker in name and name.endswith(TEMP_SUFFIX):
                remove_quietly(Path(directory) / name)
                removed += 1
    return removed
