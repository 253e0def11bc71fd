"""Progress bars (tqdm, on a terminal only) for scanning, uploads and finished images."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    """Bars only when enabled: a disabled tqdm still starts its monitor thread."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: dict[str, tqdm[Any]] = {}

    def _bar(self, name: str, desc: str, position: int) -> tqdm[Any] | None:
        if not self.enabled:
            return None
        bar = self._bars.get(name)
        if bar is None:
            bar = tqdm(desc=desc, unit="img", position=position, leave=True,
                       dynamic_ncols=True)
            self._bars[name] = bar
        return bar

    def _update(self, name: str, desc: str, position: int, n: int) -> None:
        bar = self._bar(name, desc, position)
        if bar is not None:
            bar.update(n)

    def scanned(self, n: int = 1) -> None:
        self._update("scan", "scanned ", 0, n)

    def set_total(self, total: int) -> None:
        for name, desc, position in (("sent", "uploaded", 1), ("done", "saved   ", 2)):
            bar = self._bar(name, desc, position)
            if bar is not None:
                bar.total = total
                bar.refresh()

    def sent(self, n: int = 1) -> None:
        self._update("sent", "uploaded", 1, n)

    def done(self, n: int = 1) -> None:
        self._update("done", "saved   ", 2, n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
