"""Results this user's runs saved into other output folders: a photo retouched before, under
the same options, is copied from there rather than paid for again because a run gives it a
new ``--out``.

Each SQLite ledger a run opens is listed, with its output folder, in one file per user
(``$XDG_STATE_HOME/skinbatch/ledgers``, else ``~/.local/state/skinbatch/ledgers``). The scan
asks the other ledgers on that list, read-only, about the photos it finds new; a ledger on a
drive not plugged in, or deleted with its folder, is not asked: its results are not to be had.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import NamedTuple

from batch.config import RunConfig
from batch.ledger import Born, Ledger, TransitionInfo
from batch.ledger.store import EMULATED, IDENTITY, StaleTransition, Write
from batch.names import STATE_DIR, shown
from batch.outputs import sha256_file
from batch.states import JobState

log = logging.getLogger("batch.elsewhere")

#: The error code of a photo another folder's ledger holds done whose saved result is not
#: there to copy (moved or deleted): buying it again is the user's call (--pay-again).
RETOUCHED_ELSEWHERE = "RETOUCHED_ELSEWHERE"

Key = tuple[str, str]
"""A job's identity: its photo's key and its options' fingerprint."""


class Earlier(NamedTuple):
    """A photo another ledger holds done: its result's hash, the output folder, and the
    saved result there (None once it is moved or deleted)."""

    result_sha256: str
    folder: Path
    output: Path | None

    @property
    def born(self) -> Born:
        """How this photo's job starts: done, its outputs copies of the saved result; or,
        with none to copy, rejected with why. Neither is paid for again."""
        before = f"retouched before into {shown(str(self.folder))}, under the same options"
        if self.output is not None:
            return Born(JobState.DONE, f"{before}: its result is copied from there, not paid "
                        "for again (--pay-again buys it again)", result_sha256=self.result_sha256)
        return Born(JobState.REJECTED, f"{before}, but its result is no longer there (moved or "
                    "deleted): not paid for again (--pay-again buys it again)",
                    RETOUCHED_ELSEWHERE)


def tell_copied(copied: int) -> None:
    if copied:
        log.info("%d photo(s) were retouched before into another output folder, under the same "
                 "options: their results are copied from there, not paid for again.", copied)


def at_start(ledger: Ledger, config: RunConfig) -> tuple[Elsewhere | None, int]:
    """What a run, and its dry run, do before the scan: with --pay-again, the photos rejected
    for a result gone from another folder go back in line (to be bought); otherwise the other
    ledgers are made ready for the scan, and the jobs it will not see again are looked for
    (:func:`look_again`). Returns them, and how many results are copied."""
    if config.pay_again:
        ledger.reset_jobs([JobState.REJECTED], "sent again: --pay-again",
                          error_code=RETOUCHED_ELSEWHERE)
    others = of_run(config, ledger.image_identity)
    return others, look_again(ledger, others) if others is not None else 0


def look_again(ledger: Ledger, others: Elsewhere) -> int:
    """Jobs the scan will not see again that another folder's ledger holds done: a photo a
    killed run left waiting to be sent starts as a new photo would (:attr:`Earlier.born`);
    one rejected for a result gone from there is copied once the result is back. Returns how
    many are copied."""
    if not others.others:
        return 0
    waiting = [job for job in ledger.jobs_in([JobState.PENDING, JobState.REJECTED])
               if job.state is JobState.PENDING or job.error_code == RETOUCHED_ELSEWHERE]
    found = others.results({(job.content_sha256, job.options_fp) for job in waiting})
    writes: list[Write] = []
    for job in waiting:
        if (earlier := found.get((job.content_sha256, job.options_fp))) is None or \
                job.state is (born := earlier.born).state:
            continue
        if job.state is JobState.REJECTED:
            writes.append(ledger.transition_write(job.id, JobState.PENDING, expect=job.state,
                          info=TransitionInfo(message="its result is back in "
                                                      f"{earlier.folder}")))
        writes.append(ledger.transition_write(
            job.id, born.state, expect=JobState.PENDING, result_sha256=born.result_sha256,
            info=TransitionInfo(message=born.message, error_code=born.error_code)))
    try:
        outcomes = ledger.commit(writes) if writes else []
    except StaleTransition:  # the only one, moved meanwhile
        return 0
    return sum(1 for write, outcome in zip(writes, outcomes, strict=True)
               if outcome is None and write.point == JobState.DONE.value)


def registry() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "skinbatch" / "ledgers"


def listed() -> dict[Path, Path | None]:
    """Each listed ledger with its output folder (None: not known, and the ledger not in its
    default place under it)."""
    try:
        lines = registry().read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError:
        return {}
    found: dict[Path, Path | None] = {}
    for line in lines:
        ledger, _, out = line.partition("\t")
        if ledger:
            found[Path(ledger)] = Path(out) if out else _beside(ledger)
    return found


def _beside(ledger: str) -> Path | None:
    return Path(ledger).parent.parent if Path(ledger).parent.name == STATE_DIR else None


def remember(config: RunConfig) -> None:
    """Add the run's ledger file and output folder to the user's list (a list that cannot be
    written is no reason to stop a run: only the copies from other folders go without it)."""
    ledger, out = config.ledger_file, config.out.expanduser().resolve()
    if ledger is None or listed().get(ledger) == out:
        return
    with contextlib.suppress(OSError):
        registry().parent.mkdir(parents=True, exist_ok=True)
        # surrogateescape: a path's bytes as they are, UTF-8 or not (an old share's names).
        with open(registry(), "a", encoding="utf-8", errors="surrogateescape") as lines:
            lines.write(f"{ledger}\t{out}\n")


def of_run(config: RunConfig, image_identity: bool) -> Elsewhere | None:
    """The other ledgers a run asks, or None: with --pay-again, or on a database ledger
    (shared by the machines of a batch, and no file of this user's)."""
    if config.pay_again or config.ledger_file is None:
        return None
    return Elsewhere(config.ledger_file, emulated=config.bundled_emulator,
                     image_identity=image_identity)


def _verified(out: Path, written: str | None, result_sha256: str) -> Path | None:
    """The result saved at ``written`` under ``out``, if its bytes are still the result's (a
    photo edited by hand there since is no longer the result)."""
    path = out / written if written else None
    with contextlib.suppress(OSError):
        if path is not None and sha256_file(path) == result_sha256:
            return path
    return None


class Elsewhere:
    """The other ledgers of this user whose results are of the same kind as this run's (the
    API's or the bundled emulator's imitations) and whose photos are keyed the same way."""

    def __init__(self, own: Path, *, emulated: bool, image_identity: bool) -> None:
        """``own``: this run's ledger file, resolved (it is not asked)."""
        self.others = {ledger: out for ledger, out in listed().items()
                       if ledger != own and out is not None}
        self.emulated, self.image_identity = emulated, image_identity
        self._open = threading.local()

    def results(self, keys: Collection[Key]) -> dict[Key, Earlier]:
        """Of ``keys``, those another ledger holds done, each with its saved result if one is
        still there (from whichever ledger has one)."""
        found: dict[Key, Earlier] = {}
        wanted = set(keys)
        for ledger, out in self.others.items():
            shas = sorted({sha for sha, fp in wanted
                           if (sha, fp) not in found or found[(sha, fp)].output is None})
            if not shas or not ledger.is_file():
                continue
            with contextlib.suppress(sqlite3.Error):
                for sha, fp, result, written in self._done(ledger, shas):
                    had = found.get((sha, fp))
                    if (sha, fp) in wanted and result and (had is None or had.output is None):
                        found[(sha, fp)] = Earlier(result, out, _verified(out, written, result))
        return found

    def saved_result(self, key: Key, result_sha256: str) -> Path | None:
        """A result saved in another folder for ``key`` whose bytes are ``result_sha256``."""
        earlier = self.results([key]).get(key)
        if earlier is None or earlier.result_sha256 != result_sha256:
            return None
        return earlier.output

    @contextlib.contextmanager
    def kept_open(self) -> Iterator[None]:
        """The other ledgers stay open in this thread while the block runs (a scan asks them
        once per batch of photos) and are let go at its end: an open file would keep its drive
        from being unmounted between a watch's passes."""
        self._open.ledgers = {}
        try:
            yield
        finally:
            for db in self._open.ledgers.values():
                if db is not None:
                    db.close()
            self._open.ledgers = None

    def _done(self, ledger: Path, shas: list[str]
              ) -> list[tuple[str, str, str | None, str | None]]:
        """The done jobs of ``ledger`` among ``shas``, with their saved results' paths."""
        kept: dict[Path, sqlite3.Connection | None] | None = getattr(self._open, "ledgers", None)
        if kept is None:
            if (db := self._connect(ledger)) is None:
                return []
            with contextlib.closing(db):
                return _done_in(db, shas)
        if ledger not in kept:
            kept[ledger] = self._connect(ledger)
        return _done_in(db, shas) if (db := kept[ledger]) is not None else []

    def _connect(self, ledger: Path) -> sqlite3.Connection | None:
        """``ledger`` opened read-only; None if its results are of another kind, or its photos
        keyed another way."""
        db = sqlite3.connect(f"{ledger.as_uri()}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                   (EMULATED, IDENTITY)).fetchall())
        except sqlite3.Error:
            db.close()
            raise
        if (meta.get(EMULATED) == "1") == self.emulated and \
                (meta.get(IDENTITY) != "file") == self.image_identity:
            return db
        db.close()
        return None


def _done_in(db: sqlite3.Connection, shas: list[str]
             ) -> list[tuple[str, str, str | None, str | None]]:
    # The keys as one JSON array: the statement's text is the same for every batch, so the
    # connection prepares it once. "+j.state" keeps the planner off the index by state, which
    # would read every job done there for each batch rather than look up the batch's photos.
    return db.execute(
        "SELECT j.content_sha256, j.options_fp, j.result_sha256, f.written_rel FROM jobs j "
        "LEFT JOIN files f ON f.job_id = j.id AND f.written_sha256 = j.result_sha256 "
        "WHERE +j.state = 'done' AND j.content_sha256 IN (SELECT value FROM json_each(?))",
        (json.dumps(shas),)).fetchall()
