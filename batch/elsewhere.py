"""Results this user's runs saved into other output folders: a photo retouched before, under
the same options, is not paid for again because a run gives it a new ``--out``.

Each SQLite ledger a run opens is listed in one file per user (``$XDG_STATE_HOME/skinbatch/
ledgers``, else ``~/.local/state/skinbatch/ledgers``); before an upload, the other ledgers on
that list are asked, read-only, whether they hold the photo done. A ledger on a drive not
plugged in, or deleted with its folder, is not asked: its results are not to be had.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from batch.config import RunConfig
from batch.ledger.store import EMULATED, IDENTITY

#: The error code of a job not sent because another ledger holds its photo done.
RETOUCHED_ELSEWHERE = "RETOUCHED_ELSEWHERE"


def not_again(there: Path) -> str:
    """Why a photo retouched into ``there`` before is not sent."""
    return (f"retouched before into {there}, under the same options: not paid for again (its "
            f"result is there; --out {there} adds this folder's photos to it, and --pay-again "
            "buys it again)")


def registry() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "skinbatch" / "ledgers"


def listed() -> list[Path]:
    try:
        lines = registry().read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [Path(line) for line in dict.fromkeys(lines) if line]


def remember(config: RunConfig) -> None:
    """Add the run's ledger file to the user's list (a list that cannot be written is no
    reason to stop a run: only this check goes without it)."""
    ledger = config.ledger_file
    if ledger is None or ledger in listed():
        return
    with contextlib.suppress(OSError):
        registry().parent.mkdir(parents=True, exist_ok=True)
        with open(registry(), "a", encoding="utf-8") as out:
            out.write(f"{ledger}\n")


def output_folder(ledger: Path) -> Path:
    """The ``--out`` a ledger in its default place belongs to, else the ledger itself."""
    return ledger.parent.parent if ledger.parent.name == ".skinbatch" else ledger


def of_run(config: RunConfig, image_identity: bool) -> Elsewhere | None:
    """The other ledgers a run asks, or None: with --pay-again, or on a database ledger
    (shared by the machines of a batch, and no file of this user's)."""
    if config.pay_again or config.ledger_file is None:
        return None
    return Elsewhere(config.ledger_file, emulated=config.bundled_emulator,
                     image_identity=image_identity)


class Elsewhere:
    """The other ledgers of this user whose results are of the same kind as this run's (the
    API's or the bundled emulator's imitations) and whose photos are keyed the same way."""

    def __init__(self, own: Path, *, emulated: bool, image_identity: bool) -> None:
        """``own``: this run's ledger file, resolved (it is not asked)."""
        self.others = [ledger for ledger in listed() if ledger != own]
        self.emulated, self.image_identity = emulated, image_identity

    def done_in(self, content_sha256: str, options_fp: str) -> Path | None:
        """The output folder of another ledger that holds this photo done under these
        options, if any."""
        for ledger in self.others:
            if not ledger.is_file():
                continue
            with contextlib.suppress(sqlite3.Error):
                if self._holds(ledger, content_sha256, options_fp):
                    return output_folder(ledger)
        return None

    def _holds(self, ledger: Path, content_sha256: str, options_fp: str) -> bool:
        with contextlib.closing(sqlite3.connect(f"{ledger.as_uri()}?mode=ro", uri=True)) as db:
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                   (EMULATED, IDENTITY)).fetchall())
            if (meta.get(EMULATED) == "1") != self.emulated or \
                    (meta.get(IDENTITY) != "file") != self.image_identity:
                return False
            return db.execute("SELECT 1 FROM jobs WHERE content_sha256 = ? AND options_fp = ? "
                              "AND state = 'done'", (content_sha256, options_fp)).fetchone() \
                is not None
