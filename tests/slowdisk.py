"""Building ``slowdisk.c``: every fsync of a process that preloads it takes longer, as on a
spinning disk, and so, if asked, does every read of a file in one folder, as on a slow share.
Used by the crash tests, the tests of stopping a run, and by the benchmarks."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("slowdisk.c")


def build(directory: Path) -> Path:
    """Compile it with the machine's C compiler into ``directory``; raises OSError (no
    compiler) or CalledProcessError."""
    library = directory / "slowdisk.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(SOURCE), "-ldl"],
                   check=True, capture_output=True)
    return library


def environment(library: Path, extra_us: int = 20000) -> dict[str, str]:
    """What a child process needs in its environment to have every fsync ``extra_us`` slower."""
    return {"LD_PRELOAD": str(library), "SLOW_FSYNC_US": str(extra_us)}


def slow_reads(library: Path, under: Path, extra_us: int) -> dict[str, str]:
    """What a child process needs in its environment to have every read of a file under
    ``under`` take ``extra_us`` longer (and no fsync)."""
    return {"LD_PRELOAD": str(library), "SLOW_READ_UNDER": str(under.resolve()),
            "SLOW_READ_US": str(extra_us), "SLOW_FSYNC_US": "0"}
