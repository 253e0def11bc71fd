"""What the ledger says: counts by state, credits spent, and every file that needs attention."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from batch import answers
from batch.ledger import Ledger
from batch.ledger.store import NOT_SAVED, Problem
from batch.ledger.workers import WorkerRecords, WorkerRow
from batch.options import Options
from batch.states import UNFINISHED
from batch.stripping import tally


def unsaved_words(credits: int) -> str:
    return f"{credits} credit(s) paid for results {NOT_SAVED}"


EMULATED_NOTE = ("These results are imitation retouches of the bundled emulator (runs with "
                 "--emulator, or with its key), not the API's")
#: Prepared files named one by one in ``status``: a camera shoot is often all resized.
PREPARED_SHOWN = 20


def rejected(counts: dict[str, int]) -> int:
    """Images never sent, from :meth:`Ledger.counts`: rejected contents, and files that could
    not be read as one (vanished, unreadable, under an invalid folder preset), as the list of
    problems has them."""
    return counts["rejected"] + counts["unreadable_files"]


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
    #: The runs that share the ledger (listed for a shared PostgreSQL ledger only).
    workers: list[WorkerRow] = field(default_factory=list)
    #: Per worker: uploads accepted and results saved.
    work: dict[str, dict[str, int]] = field(default_factory=dict)
    #: The results are the bundled emulator's imitations (runs with --emulator).
    emulated: bool = False
    #: Of the charges, those for results not saved (see :meth:`Ledger.unsaved_charges`).
    unsaved: int = 0
    #: The failed or rejected files a person accepted unretouched (not in ``problems``).
    dismissed: list[str] = field(default_factory=list)
    #: Uploads answered once the ledger had gone, kept on this machine for the next run to
    #: record (see :mod:`batch.answers`): their jobs show as ``submitting`` meanwhile.
    answers_kept: int = 0

    @property
    def unfinished(self) -> int:
        return sum(self.counts[state.value] for state in UNFINISHED)

    @property
    def rejected(self) -> int:
        return rejected(self.counts)

    def to_json(self) -> str:
        payload: dict[str, Any] = {
            "counts": self.counts,
            "files": self.files,
            "credits_charged": self.charges,
            "credits_for_results_not_saved": self.unsaved,
            "ambiguous_submits": self.ambiguous_submits,
            "options": self.options,
            "unfinished": self.unfinished,
            "problems": [asdict(p) for p in self.problems],
            "dismissed": self.dismissed,
            "answers_kept_for_the_next_run": self.answers_kept,
            "metadata_removed_from_uploads": self.stripped,
            "prepared_before_upload": [{"path": path, "note": note}
                                       for path, note in self.prepared],
            "workers": [worker_entry(w, self.work.get(w.name, {})) for w in self.workers],
            "bundled_emulator": self.emulated,
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
        if self.unsaved:
            lines.append(f"of them {unsaved_words(self.unsaved)}")
        if self.answers_kept:
            lines.append(f"{self.answers_kept} upload(s) answered once the ledger had gone are "
                         "kept on this machine: the next run records them, not paying again")
        if self.emulated:
            lines.append(EMULATED_NOTE)
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
        if self.workers:
            lines.append("workers:")
            lines += [f"  {describe_worker(w, self.work.get(w.name, {}))}" for w in self.workers]
        if self.dismissed:
            lines.append(f"dismissed (accepted unretouched, not listed): {len(self.dismissed)} "
                         "file(s); status --json lists them, retry --failed/--rejected PATHS "
                         "sends one again")
        if self.problems:
            # Not "files": a folder a scan could not list, a source it did not finish, are here.
            lines.append(f"needing attention ({len(self.problems)}):")
            lines += [f"  {p.state:9} {p.path}: {problem_words(p)}" for p in self.problems]
        return "\n".join(lines)


def problem_words(problem: Problem) -> str:
    """A problem's reason, with the code and HTTP status it does not say already (an API
    error's reason names both)."""
    if not problem.error_code or problem.error_code in problem.reason:
        return problem.reason
    http = f"HTTP {problem.http_status}"
    http = f", {http}" if problem.http_status and http not in problem.reason else ""
    return f"{problem.reason} [{problem.error_code}{http}]"


def worker_entry(w: WorkerRow, work: dict[str, int]) -> dict[str, Any]:
    """A worker as the JSON of ``status`` and of the report has it."""
    return {**asdict(w), "live": w.live, **work}


def describe_worker(w: WorkerRow, work: dict[str, int]) -> str:
    if w.taken_over_by is not None:
        state = (f"lease lapsed; its {w.taken_over_jobs or 0} job(s) taken over by "
                 f"{w.taken_over_by}")
    elif w.stopped_at is not None:
        state = f"stopped {datetime.fromtimestamp(w.stopped_at):%Y-%m-%d %H:%M}"
    elif w.live:
        state = f"live, last heartbeat {w.silent_for:.1f} s ago"
    else:
        state = f"silent for {w.silent_for:.0f} s (lease {w.lease_seconds:g} s): lapsing"
    holding = ", ".join(f"{state} {n}" for state, n in sorted(w.holding.items()))
    done = ", ".join(f"{what} {n}" for what, n in sorted(work.items()))
    return (f"{w.name} ({w.host}, pid {w.pid}): {state}"
            + (f"; holds {holding}" if holding else "") + (f"; {done}" if done else ""))


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
        workers=WorkerRecords(ledger).listing() if ledger.shared else [],
        work=WorkerRecords(ledger).work() if ledger.shared else {},
        emulated=ledger.emulated(),
        unsaved=ledger.unsaved_charges(),
        dismissed=ledger.dismissed(),
        answers_kept=len(answers.kept(ledger.file)),
    )


def _removed(by_record: dict[str, int]) -> dict[str, int]:
    """Blocks of metadata removed from uploads, by kind, over every job sent."""
    totals: Counter[str] = Counter()
    for described, jobs in by_record.items():
        for kind, n in tally(described).items():
            totals[kind] += n * jobs
    return dict(sorted(totals.items()))
