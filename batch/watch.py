"""Watch mode: new and moved-in files are taken as they arrive (watchdog), once settled.

Events only say "look again soon": the actual work is the same cheap stat-only re-scan the
one-shot run uses, so a missed event costs at most one ``rescan`` interval, never a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from batch.copies import materialize_copies
from batch.elsewhere import tell_copied
from batch.options import held_words
from batch.requeue import read_again, try_again_given_up
from batch.scan import ScanStats, SourceRoot, scan, tell_left_out, unreadable_words
from batch.stages.runtime import Runtime

log = logging.getLogger("batch.watch")


@dataclass(frozen=True)
class WatchSettings:
    #: A file is taken once its size and mtime have not changed for this long (and it decodes).
    settle: float = 5.0
    #: A full (stat-only) re-scan this often, whatever the events say.
    rescan: float = 60.0
    #: Poll the filesystem instead of inotify (network shares; also the automatic fallback).
    polling: bool = False


class _Nudge(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self.loop, self.event = loop, event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "modified", "moved", "closed"):
            self.loop.call_soon_threadsafe(self.event.set)


def _start_observer(roots: list[SourceRoot], handler: _Nudge, polling: bool) -> Any:
    """inotify where it works; polling when asked, or when inotify is unavailable or out of
    watches (a clear message says so)."""
    if not polling:
        observer = None
        try:
            observer = Observer()  # watchdog >= 5 opens the inotify instance right here
            for root in roots:
                if os.path.exists(root.path):  # one away is watched again once it is back
                    observer.schedule(handler, str(root.path), recursive=True)
            observer.start()
            if (why := _uncovered(roots)) is not None:
                raise OSError(errno.ENOSPC, why)
            return observer
        except OSError as exc:
            _say_polling(exc.strerror or exc)
            if observer is not None:
                observer.stop()
    observer = PollingObserver(timeout=2)
    for root in roots:
        if os.path.exists(root.path):
            observer.schedule(handler, str(root.path), recursive=True)
    observer.start()
    return observer


def _say_polling(why: object) -> None:
    log.warning("Cannot watch with inotify (%s); polling instead. For many folders raise "
                "fs.inotify.max_user_watches (sysctl).", why)


def _uncovered(roots: list[SourceRoot]) -> str | None:
    """Why some source folder has no inotify watch, or None. watchdog skips a subfolder it
    cannot watch without a word, which would leave new files there to the slow re-scan."""
    watches = inotify_watches()
    if watches is None:
        return None
    folders = sum(folder_count(root.path) for root in roots)
    return (f"inotify watch limit reached: {watches} of {folders} folders watched"
            if watches < folders else None)


def _still_covered(roots: list[SourceRoot]) -> bool:
    """Folders made since the start need watches too; the limit can be hit later on."""
    if _uncovered(roots) is None:
        return True
    time.sleep(1.0)  # a folder made a moment ago may not have its watch yet
    why = _uncovered(roots)
    if why is not None:
        _say_polling(why)
    return why is None


def inotify_watches() -> int | None:
    """How many inotify watches this process holds (None where /proc cannot tell)."""
    total = 0
    try:
        descriptors = os.listdir("/proc/self/fdinfo")
    except OSError:
        return None
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                total += sum(1 for line in info if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def folder_count(path: Path) -> int:
    """The folders a recursive watch of ``path`` needs (symlinked folders are not followed)."""
    return sum(1 for _ in os.walk(path)) if os.path.isdir(path) else 0


async def watch_sources(rt: Runtime, settings: WatchSettings, roots: list[SourceRoot],
                        totals: ScanStats) -> None:
    """Take new files as they arrive until cancelled; each pass's counts go into ``totals``."""
    loop = asyncio.get_running_loop()
    nudged = asyncio.Event()
    observer = _start_observer(roots, _Nudge(loop, nudged), settings.polling)
    missing: set[Path] = set()
    said = _Said({f for f, _ in totals.left_out}, {f for f, _ in totals.unreadable_folders},
                 totals.held)
    log.info("Watching %s (settle %gs, full re-scan every %gs).",
             ", ".join(str(r.path) for r in roots), settings.settle, settings.rescan)
    try:
        next_pass = 0.0
        while True:
            if nudged.is_set():
                nudged.clear()
                next_pass = min(next_pass, time.monotonic() + settings.settle)
            delay = next_pass - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(nudged.wait(), timeout=min(delay, 1.0))
                continue
            reachable, back = _reachable(roots, missing)
            if back:  # its watches went with it
                observer.stop()
                observer = _start_observer(roots, _Nudge(loop, nudged), settings.polling)
            if not isinstance(observer, PollingObserver) and \
                    not await asyncio.to_thread(_still_covered, reachable):
                observer.stop()
                observer = _start_observer(roots, _Nudge(loop, nudged), polling=True)
            stats = await _scan_pass(rt, settings, reachable)
            if stats is None:
                next_pass = time.monotonic()
                continue
            said.tell(rt, stats)
            if await asyncio.to_thread(read_again, rt.ledger, rt.config.root_map):
                rt.wake_submitter.set()
            if rt.flags.uploads_back:  # the API takes uploads again
                rt.flags.uploads_back = False
                if await asyncio.to_thread(try_again_given_up, rt.ledger):
                    rt.wake_submitter.set()
            totals.hashed += stats.hashed
            totals.new_jobs += stats.new_jobs
            tell_copied(stats.copied)
            rt.progress.add_work(stats.new_jobs, stats.new_jobs)
            totals.found = max(totals.found, stats.found)
            if stats.hashed or stats.new_jobs:
                log.info("Found %d new file(s).", stats.hashed)
                rt.wake_submitter.set()
                # Off the loop: it copies files, and its few ledger writes may wait for the
                # stages' writer to let go of the ledger.
                await asyncio.to_thread(materialize_copies, rt.ledger, rt.out_dir,
                                        rt.config.expiry_margin, rt.reaches, rt.elsewhere)
            # Files still settling get another look soon; otherwise wait for events.
            wait = settings.settle if stats.deferred else settings.rescan
            next_pass = time.monotonic() + wait
    finally:
        observer.stop()


def _reachable(roots: list[SourceRoot], missing: set[Path]) -> tuple[list[SourceRoot], bool]:
    """The sources there now, saying which went away and which came back (``missing`` keeps
    those away); and whether one came back. os.path: a share whose server is down answers
    ENOTCONN or EIO, "not there"."""
    reachable = [r for r in roots if os.path.exists(r.path)]
    back = False
    for root in roots:
        if root not in reachable and root.path not in missing:
            missing.add(root.path)
            log.error("Source %s is not reachable; waiting for it to come back.", root.path)
        elif root in reachable and root.path in missing:
            missing.discard(root.path)
            log.warning("Source %s is back.", root.path)
            back = True
    return reachable, back


async def _scan_pass(rt: Runtime, settings: WatchSettings,
                     reachable: list[SourceRoot]) -> ScanStats | None:
    """One stat-only pass over the sources there; None when one went away during it (the
    next pass says so)."""
    try:
        return await asyncio.to_thread(
            scan, rt.ledger, reachable, rt.config.options, exclude=(rt.out_dir,),
            settle=settings.settle, prepare=rt.config.prepare, out_dir=rt.out_dir,
            on_collision=rt.config.on_collision, earlier=rt.elsewhere,
            should_stop=lambda: rt.flags.interrupted or rt.flags.abort,
            pay_again=rt.config.pay_again)
    except OSError:
        if all(os.path.exists(r.path) for r in reachable):
            raise
        return None


@dataclass
class _Said:
    """What a watch has said once and not again each pass: folders left out,
    folders it cannot read, photos held back for their options (the most so far)."""

    left_out: set[str]
    unreadable: set[str]
    held: int = 0

    def tell(self, rt: Runtime, stats: ScanStats) -> None:
        if new := [(f, words) for f, words in stats.left_out if f not in self.left_out]:
            tell_left_out(rt.ledger, new)
            self.left_out.update(f for f, _ in new)
        for folder, why in stats.unreadable_folders:
            if folder not in self.unreadable:
                log.warning("%s.", unreadable_words(folder, why))
                self.unreadable.add(folder)
        if stats.held > self.held:
            log.warning("%s", held_words(stats.held))
            self.held = stats.held
