"""What the ledger says: counts by state, credits spent, and every file that needs attention."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from batch.ledger import Ledger
from batch.ledger.store import Problem
from batch.options import Options
from batch.states import FINAL, JobState
from batch.stripping import tally

#: Prepared files named one by one in ``status``: a camera shoot is often all resized.
PREPARED_SHOWN = 20


@dataclass
class StatusReport:
    counts: dict[str, int]
    files: int
    charges: int
    ambiguous_submits: int
    problems: list[Problem]
    #: Files per effective options (after per-folder presets).
    options: dict[str, int]
    #: Blocks of metadata removed from uploads, by kind (EXIF, XMP, IPTC, comment, ...).
    stripped: dict[str, int]
    #: Files sent as a prepared copy (resized, turned upright, converted): path, what was done.
    prepared: list[tuple[str, str]]

    @property
    def unfinished(self) -> int:
        return sum(self.counts[state.value] for state in JobState if state not in FINAL)

    def to_json(self) -> str:
        payload: dict[str, Any] = {
            "counts": self.counts,
            "files": self.files,
            "credits_charged": self.charges,
            "ambiguous_submits": self.ambiguous_submits,
            "options": self.options,
            "unfinished": self.unfinished,
            "problems": [asdict(p) for p in self.problems],
            "metadata_removed_from_uploads": self.stripped,
            "prepared_before_upload": [{"path": path, "note": note}
                                       for path, note in self.prepared],
        }
        return json.dumps(payload, indent=2, ensure_ascii=False)

    def to_text(self) -> str:
        shown = [f"{state}: {n}" for state, n in self.counts.items()
                 if n and state != "unreadable_files"]
        lines = [
            f"{self.files} file(s); jobs by state: {', '.join(shown) or 'none'}",
            f"credits charged (including possible charges): {self.charges}"
            + (f"; ambiguous uploads so far: {self.ambiguous_submits}"
               if self.ambiguous_submits else ""),
        ]
        for described, n in self.options.items():
            lines.append(f"options [{described}]: {n} file(s)")
        if self.stripped:
            lines.append("metadata removed before upload: " + ", ".join(
                f"{kind} {n}" for kind, n in self.stripped.items()))
        if self.prepared:
            lines.append(f"{len(self.prepared)} file(s) sent as a prepared copy"
                         " (the originals are untouched):")
            lines += [f"  {path}: {note}" for path, note in self.prepared[:PREPARED_SHOWN]]
            if len(self.prepared) > PREPARED_SHOWN:
                lines.append(f"  ... and {len(self.prepared) - PREPARED_SHOWN} more "
                             "(status --json or the report lists them all)")
        if self.problems:
            lines.append(f"{len(self.problems)} file(s) need attention:")
            for p in self.problems:
                http = f", HTTP {p.http_status}" if p.http_status else ""
                code = f" [{p.error_code}{http}]" if p.error_code else ""
                lines.append(f"  {p.state:9} {p.path}: {p.reason}{code}")
        return "\n".join(lines)


def collect_status(ledger: Ledger) -> StatusReport:
    return StatusReport(
        counts=ledger.counts(),
        files=ledger.file_count(),
        charges=ledger.charges(),
        ambiguous_submits=ledger.ambiguous_events(),
        problems=ledger.problems(),
        options={Options.from_fingerprint(fp).describe(): n
                 for fp, n in sorted(ledger.options_in_use().items())},
        stripped=_removed(ledger.stripped()),
        prepared=ledger.prepared_files(),
    )


def _removed(by_record: dict[str, int]) -> dict[str, int]:
    """Blocks of metadata removed from uploads, by kind, over every job sent."""
    totals: Counter[str] = Counter()
    for described, jobs in by_record.items():
        for kind, n in tally(described).items():
            totals[kind] += n * jobs
    return dict(sorted(totals.items()))
