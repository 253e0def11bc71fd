"""Watch mode: new and moved-in files are taken as they arrive (watchdog), once settled.

Events only say "look again soon": the actual work is the same cheap stat-only re-scan the
one-shot run uses, so a missed event costs at most one ``rescan`` interval, never a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from batch.scan import SourceRoot, scan
from batch.stages.downloader import materialize_copies
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
        observer = Observer()
        try:
            for root in roots:
                observer.schedule(handler, str(root.path), recursive=True)
            observer.start()
            return observer
        except OSError as exc:
            log.warning("Cannot watch with inotify (%s); polling instead. For many folders "
                        "raise fs.inotify.max_user_watches.", exc)
            observer.stop()
    observer = PollingObserver(timeout=2)
    for root in roots:
        if root.path.exists():
            observer.schedule(handler, str(root.path), recursive=True)
    observer.start()
    return observer


async def watch_sources(rt: Runtime, settings: WatchSettings, roots: list[SourceRoot]) -> None:
    loop = asyncio.get_running_loop()
    nudged = asyncio.Event()
    observer = _start_observer(roots, _Nudge(loop, nudged), settings.polling)
    missing: set[Path] = set()
    log.info("Watching %s (settle %.0fs, full re-scan every %.0fs).",
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
            reachable = [r for r in roots if r.path.is_dir() or r.path.is_file()]
            for root in roots:
                if root not in reachable and root.path not in missing:
                    missing.add(root.path)
                    log.error("Source %s is not reachable; waiting for it to come back.",
                              root.path)
                elif root in reachable and root.path in missing:
                    missing.discard(root.path)
                    log.warning("Source %s is back.", root.path)
                    observer.stop()
                    observer = _start_observer(roots, _Nudge(loop, nudged), settings.polling)
            stats = await asyncio.to_thread(scan, rt.ledger, reachable, rt.config.options,
                                            exclude=(rt.out_dir,), settle=settings.settle)
            if stats.hashed or stats.new_jobs:
                log.info("Found %d new file(s).", stats.hashed)
                rt.wake_submitter.set()
                materialize_copies(rt)
            # Files still settling get another look soon; otherwise wait for events.
            wait = settings.settle if stats.deferred else settings.rescan
            next_pass = time.monotonic() + wait
    finally:
        observer.stop()
