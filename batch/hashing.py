"""Content hashes (SHA-256) of source files, as the scanner needs them.

Many small files are hashed in worker processes: per file, Python's own overhead (open, read,
hexdigest) holds the GIL, so threads would not use the second core. A few large files are hashed
in threads, where hashlib releases the GIL. The workers also read whole new folders into ledger
rows (``batch.folderread``). This module imports nothing from the rest of the package but that,
so a worker process starts in milliseconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from batch.folderread import FolderJob, FoldersRead, read_folders

#: A digest or None and the reason the file could not be read, then the size, mtime (ns) and
#: inode of the file read, from the same open file (all 0 when it could not be read). The
#: scanner records these rather than its own earlier look at the file, and a new folder is not
#: looked at before its files are read: one metadata lookup per file fewer, on the main thread.
#: (A plain tuple: the worker runs as ``__main__``, so no class of this module pickles across.)
Hashed = tuple[str | None, str | None, int, int, int]

BUFFER = 1024 * 1024
#: Batches at least this long, of files this small on average, go to worker processes (for
#: fewer, starting the processes costs more than it saves).
PROCESS_MIN_FILES = 2048
PROCESS_MAX_MEAN_BYTES = 512 * 1024

_local = threading.local()
log = logging.getLogger("batch.scan")


def _buffer() -> memoryview:
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(BUFFER))
    return view


def _sha256_fd(fd: int, size: int = -1) -> str:
    """Read through one reused buffer: allocating a large read buffer per file costs more
    than hashing a small photo. A first read that returns the whole ``size`` (as ``fstat``
    gave it) is the whole file: no second read to see its end (one system call per small
    file fewer)."""
    view = _buffer()
    n = os.readv(fd, [view])
    digest = hashlib.sha256(view[:n])
    if n == size and n < len(view):
        return digest.hexdigest()
    while n := os.readv(fd, [view]):
        digest.update(view[:n])
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def _unreadable(reason: str) -> Hashed:
    return None, reason, 0, 0, 0


def hash_one(path: str) -> Hashed:
    """The file's metadata is taken before its content is read: if it changes while being
    read, the next scan sees a newer mtime than the one recorded and reads it again.
    O_NONBLOCK: a FIFO named like a photo must not hang the scan in open()."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return _unreadable("not a regular file")
            return _sha256_fd(fd, st.st_size), None, st.st_size, st.st_mtime_ns, st.st_ino
        finally:
            os.close(fd)
    except FileNotFoundError:
        return _unreadable("the file disappeared while it was being scanned")
    except PermissionError:
        return _unreadable("permission denied: the file cannot be read")
    except IsADirectoryError:
        return _unreadable("not a regular file")
    except OSError as exc:
        return _unreadable(f"cannot read the file: {exc.strerror or exc}")


def hash_many(paths: Sequence[str]) -> list[Hashed]:
    return [hash_one(p) for p in paths]


#: What a worker process is asked: a batch of paths to hash, or of new folders to read.
_TASKS: dict[str, Callable[[Any], Any]] = {
    "paths": hash_many,
    "folders": lambda jobs: read_folders(jobs, hash_many),
}


class _WorkerProcess:
    """``python -m batch.hashing``: takes requests (a name from ``_TASKS`` and its batch,
    pickled) on stdin, answers on stdout. A plain child process rather than multiprocessing,
    which would re-import the parent's ``__main__`` (the CLI) in every worker. Its own
    session, so Ctrl-C is the parent's to handle; it exits when the parent goes away and its
    stdin closes."""

    def __init__(self) -> None:
        # -P: never import a "batch" folder from the current directory instead of this package.
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "batch.hashing"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True)

    def run(self, task: str, batch: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        pickle.dump((task, batch), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()
        return pickle.load(self.proc.stdout)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Hasher:
    """Hashes batches, or reads new folders, in the background: ``submit`` and
    ``read_folders`` return a future of the batch's results, so the scanner walks and records
    one batch while the next ones are being read."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(2, os.cpu_count() or 2)
        self._threads: ThreadPoolExecutor | None = None
        self._feeders: ThreadPoolExecutor | None = None
        self._processes: list[_WorkerProcess] = []
        self._mine = threading.local()
        self._lock = threading.Lock()

    def submit(self, paths: list[str], total_bytes: int) -> Future[list[Hashed]]:
        """A batch is handed to a feeder thread, which passes it to its worker process (many
        small files) or spreads it over the hashing threads (a few big ones)."""
        if len(paths) >= PROCESS_MIN_FILES and total_bytes / len(paths) <= PROCESS_MAX_MEAN_BYTES:
            return self._feed().submit(self._in_process, "paths", paths)
        return self._feed().submit(self._hash_in_threads, paths)

    def read_folders(self, jobs: list[FolderJob]) -> Future[FoldersRead]:
        """New folders read into ledger rows in the background (see ``batch.folderread``):
        in a worker process when they hold many files (their sizes are not known yet: a
        process hashes big files as fast as a thread, only for a few is it not worth
        starting), else here, their photos spread over the hashing threads."""
        if sum(len(job.names) for job in jobs) >= PROCESS_MIN_FILES:
            return self._feed().submit(self._in_process, "folders", jobs)
        return self._feed().submit(read_folders, jobs, self._hash_in_threads)

    def _feed(self) -> ThreadPoolExecutor:
        if self._feeders is None:
            self._feeders = ThreadPoolExecutor(self.workers, thread_name_prefix="hash-feed")
        return self._feeders

    def _hash_in_threads(self, paths: list[str]) -> list[Hashed]:
        if self._threads is None:
            with self._lock:
                if self._threads is None:
                    self._threads = ThreadPoolExecutor(self.workers + 1,
                                                       thread_name_prefix="hash")
        return list(self._threads.map(hash_one, paths))

    def _in_process(self, task: str, batch: Any) -> Any:
        """Runs in a feeder thread, which owns one worker process."""
        worker: _WorkerProcess | None = getattr(self._mine, "worker", None)
        try:
            if worker is None:
                worker = self._mine.worker = _WorkerProcess()
                with self._lock:
                    self._processes.append(worker)
            return worker.run(task, batch)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            log.warning("A hashing process failed (%s); hashing here instead.", exc)
            self._mine.worker = None
            if worker is not None:
                worker.proc.kill()
            return _TASKS[task](batch)

    def close(self) -> None:
        for pool in (self._feeders, self._threads):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        for worker in self._processes:
            worker.close()

    def __enter__(self) -> Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: How much lower than the scanner's the workers' CPU priority is.
WORKER_NICENESS = 10


def _yield_to_the_scanner() -> None:
    """The scanner's own thread makes the ledger's inserts, the critical path of a first scan
    of many small files; the workers reading ahead of it are to take the CPU it leaves, not
    share it evenly. Where the kernel groups processes by session for scheduling (autogroup,
    on by default in most Linux distributions) a nice value counts only within the group,
    and a worker has a session of its own: the group's is set too."""
    os.nice(WORKER_NICENESS)
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(WORKER_NICENESS))
    except OSError:
        pass  # no autogroup here: the process's own nice value is what counts


def _serve() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _yield_to_the_scanner()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            task, batch = pickle.load(stdin)
            pickle.dump(_TASKS[task](batch), stdout, protocol=pickle.HIGHEST_PROTOCOL)
            stdout.flush()
    except (EOFError, BrokenPipeError):
        # The scanner is done, or gone (killed): nothing to answer, nothing to clean up. No
        # interpreter teardown either: the scanner waits for this exit (30 ms of a scan).
        os._exit(0)


if __name__ == "__main__":
    _serve()
