"""Progress bars (tqdm, on a terminal only) for scanning, uploads and saved images.

The totals count what this run will really upload and save: a job that fails or is
rejected leaves them and is counted on its own, so the bars end at 100 % of what happened.
"""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a bar is first drawn: an unattended run draws none
    from tqdm import tqdm

SCAN, SENT, SAVED = "scan", "sent", "saved"
_BARS = {SCAN: ("scanned ", 0), SENT: ("uploaded", 1), SAVED: ("saved   ", 2)}


class Progress:
    """Bars only when enabled: a disabled tqdm still starts its monitor thread."""

    def __init__(self, enabled: bool | None = None, file: IO[str] | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.file = file
        self._bars: dict[str, tqdm[Any]] = {}
        self.not_delivered = 0

    def _bar(self, name: str) -> tqdm[Any] | None:
        if not self.enabled:
            return None
        bar = self._bars.get(name)
        if bar is None:
            from tqdm import tqdm

            desc, position = _BARS[name]
            bar = tqdm(desc=desc, unit="img", position=position, leave=True,
                       dynamic_ncols=True, file=self.file)
            self._bars[name] = bar
        return bar

    def _update(self, name: str, n: int) -> None:
        bar = self._bar(name)
        if bar is not None:
            bar.update(n)

    def _add_total(self, name: str, n: int) -> None:
        bar = self._bar(name)
        if bar is not None:
            bar.total = (bar.total or 0) + n
            bar.refresh()

    def scanned(self, n: int = 1) -> None:
        self._update(SCAN, n)

    def rejected(self, n: int) -> None:
        """Files the scan refused (not images, corrupt, over the limits): no upload, no save."""
        bar = self._bar(SCAN)
        if bar is not None and n:
            bar.set_postfix_str(f"rejected: {n}")

    def add_work(self, to_upload: int, to_save: int) -> None:
        """More jobs this run will upload (and save: the paid ones still waiting count too)."""
        self._add_total(SENT, to_upload)
        self._add_total(SAVED, to_save)

    def sent(self, n: int = 1) -> None:
        self._update(SENT, n)

    def saved(self, n: int = 1) -> None:
        self._update(SAVED, n)

    def dropped(self, *, uploaded: bool) -> None:
        """A job that ended without an output (failed, rejected): out of the totals, counted
        beside them."""
        self.not_delivered += 1
        if not uploaded:
            self._add_total(SENT, -1)
        self._add_total(SAVED, -1)
        bar = self._bar(SAVED)
        if bar is not None:
            bar.set_postfix_str(f"failed or rejected: {self.not_delivered}")

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
