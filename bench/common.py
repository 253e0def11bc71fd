"""Shared helpers: images on disk, running the CLI as a measured child process."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from batch.emulator import Emulator
from tests.imagegen import write_portrait

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
# The child reports its own VmHWM: ru_maxrss would carry over the parent's high-water mark
# through fork+exec on Linux and measure the benchmark process instead. It reports too the
# bytes it sent to the disks: those it wrote less those it truncated before they got there.
WRAPPER = ("import atexit, sys\n"
           "def peak():\n"
           "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
           "    print('PEAK_RSS_KB', hwm.split()[1], file=sys.stderr)\n"
           "    io = dict(l.split(':') for l in open('/proc/self/io').read().splitlines())\n"
           "    sent = int(io['write_bytes']) - int(io['cancelled_write_bytes'])\n"
           "    print('DISK_WRITTEN', sent, file=sys.stderr)\n"
           "atexit.register(peak)\n"
           "from batch.cli import main\nmain()\n")


def make_images(folder: Path, count: int, size: tuple[int, int] = (64, 80)) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"batch {i // 100:02d}" / f"img {i:05d}.jpg"
        write_portrait(path, "JPEG", seed=i, size=size)
        paths.append(path)
    return paths


@dataclass
class ChildRun:
    returncode: int
    wall: float
    cpu: float
    peak_rss_mb: float
    stdout: str
    stderr: str
    #: Bytes the child sent to the disks.
    disk_written: int = 0


def client_env(emulator: Emulator) -> dict[str, str]:
    """The environment of a benchmark's run: the emulator, and a list of ledgers of its own,
    as the runs send the same pictures over and over and each must pay for them (see
    batch.elsewhere)."""
    return {**os.environ, "AILAB_API_KEY": KEY, "AILAB_API_BASE": emulator.api_base,
            "PYTHONPATH": str(ROOT),
            "XDG_STATE_HOME": tempfile.mkdtemp(prefix="skinbatch-bench-state-")}


def run_cli(args: list[str], emulator: Emulator, extra_env: dict[str, str] | None = None,
            timeout: float = 1800) -> ChildRun:
    """Run ``skinbatch`` in a child process; measure wall time, its CPU and its peak RSS."""
    env = {**client_env(emulator), **(extra_env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak = next((int(line.split()[1]) for line in proc.stderr.splitlines()
                 if line.startswith("PEAK_RSS_KB")), 0)
    written = next((int(line.split()[1]) for line in proc.stderr.splitlines()
                    if line.startswith("DISK_WRITTEN")), 0)
    return ChildRun(proc.returncode, wall, cpu, peak / 1024, proc.stdout, proc.stderr, written)
