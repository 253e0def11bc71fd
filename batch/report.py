"""The morning report: an HTML page (the batch at a glance, problems, before/after pairs),
CSV or JSON.

The page fetches nothing from the network. Its previews are the files the downloader keeps
under ``OUT/.skinbatch/thumbs`` and its full-size views the outputs and sources themselves,
linked relative to the page, so the page stays small and opens at once at any batch size.
"""

from __future__ import annotations

import csv
import functools
import html
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from batch import thumbnails
from batch.ledger import Ledger
from batch.ledger.store import LAST_RUN, RUN_STARTED, RUNS, fetch_again_words, fetchable
from batch.ledger.workers import WorkerRecords
from batch.names import SHOWN
from batch.options import Options
from batch.outputs import remove_quietly
from batch.states import FINAL, IN_FLIGHT, NEEDS_ATTENTION, JobState
from batch.status import EMULATED_NOTE, describe_worker, unsaved_words, worker_entry
from batch.worker import at_work

#: Results whose links expire within this many seconds need a person's attention.
EXPIRING_SOON = 6 * 3600


@dataclass
class ReportData:
    generated: str
    counts: dict[str, int]
    credits_total: int
    last_run: dict[str, Any]
    rows: list[dict[str, Any]]
    attention: list[dict[str, Any]]
    out_dir: Path
    #: Files in the batch, when its first job was made, and how many runs it has had.
    files: int
    since: str
    runs: int
    #: The workers of a shared ledger, each in one line (see ``batch.status``), and as rows.
    workers: list[str]
    worker_rows: list[dict[str, Any]]
    #: The results are the bundled emulator's imitations (runs with --emulator).
    emulated: bool = False
    #: The latest run has not recorded its end: it is under way, or it was killed.
    run_note: str | None = None
    #: Of the charges, those for results not saved (see :meth:`Ledger.unsaved_charges`).
    unsaved: int = 0


@functools.cache
def _described(options_fp: str) -> str:
    return Options.from_fingerprint(options_fp).describe()


def collect(ledger: Ledger, out_dir: Path) -> ReportData:
    rows = ledger.report_rows()
    now = time.time()
    attention = [{"source": p.path, "why": p.reason} for p in ledger.scan_problems()]
    for row in rows:
        path = f"{row['root'].rstrip('/')}/{row['rel_path']}"
        row["source"] = path
        row["options"] = _described(row["options_fp"]) if row["options_fp"] else ""
        row["state"] = row["state"] or "rejected"
        row["reason"] = row["problem"] or row["reason"] or ""
        if row["dismissed_at"] is not None:
            row["reason"] += " (dismissed: accepted unretouched)"
        expires = row["expires_at"]
        row["expires"] = datetime.fromtimestamp(expires).isoformat(timespec="minutes") \
            if expires else ""
        why = _why_attention(row, now)
        if why is not None:
            attention.append({"source": path, "why": why})
    last_run = json.loads(ledger.get_meta(LAST_RUN) or "{}")
    first = ledger.first_job_at()
    workers = WorkerRecords(ledger).listing() if ledger.shared else []
    work = WorkerRecords(ledger).work() if workers else {}
    return ReportData(datetime.now().astimezone().isoformat(timespec="seconds"),
                      {k: v for k, v in ledger.counts().items() if v}, ledger.charges(),
                      last_run, rows, attention, out_dir, len(rows),
                      datetime.fromtimestamp(first).astimezone().isoformat(timespec="minutes")
                      if first else "", int(ledger.get_meta(RUNS) or 0),
                      [describe_worker(w, work.get(w.name, {})) for w in workers],
                      [worker_entry(w, work.get(w.name, {})) for w in workers],
                      ledger.emulated(), _unfinished_run(ledger, last_run),
                      ledger.unsaved_charges())


def _unfinished_run(ledger: Ledger, last_run: dict[str, Any]) -> str | None:
    """What became of a run that started after the last one that ended: under way, or
    killed (a power cut, the kernel out of memory) before it could say anything."""
    started = json.loads(ledger.get_meta(RUN_STARTED) or "{}")
    if not started or ("started" in last_run and datetime.fromisoformat(started["started"])
                       <= datetime.fromisoformat(last_run["started"])):
        return None
    when = started["started"]
    if any(w.name == started["worker"] for w in at_work(ledger)):
        return f"A run is under way: it started {when}."
    return (f"The last run, started {when}, ended without finishing (it was killed, or the "
            "machine went down): what it paid for is in the ledger. Run the same command "
            "again to carry on.")


def _why_attention(row: dict[str, Any], now: float) -> str | None:
    """Why a person should look at this file in the morning, if they should."""
    if row["state"] == JobState.AMBIGUOUS.value:
        return "upload answer lost (may be charged): skinbatch retry --ambiguous to resend"
    if row["state"] == JobState.SUBMITTING.value:  # no task, no link yet
        return ("uploaded, its answer not recorded (a run under way, or stopped before it): "
                "the next run records it or counts it lost (may be charged)")
    if row["state"] in IN_FLIGHT:
        expires = row["expires_at"]
        soon = " (soon!)" if expires and expires - now < EXPIRING_SOON else ""
        return (f"paid, result not saved yet: run again before its link expires "
                f"{row['expires']}{soon}")
    if row["state"] == JobState.EXPIRED.value:
        return "result link expired before it was saved"
    if row["dismissed_at"] is None and fetchable(row["state"], row["result_urls"],
                                                 row["expires_at"], now):
        return f"its download failed; {fetch_again_words(row['expires_at'])}"
    return None


CSV_FIELDS = ["source", "written_rel", "state", "reason", "error_code", "http_status",
              "request_id", "log_id", "charges", "expires", "options", "prepared"]


def to_csv(data: ReportData) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in data.rows:
        writer.writerow({**row, "written_rel": row["written_rel"] or ""})
    return buffer.getvalue()


def to_json(data: ReportData) -> str:
    return json.dumps({
        "generated": data.generated, "counts": data.counts, "credits_total": data.credits_total,
        "credits_for_results_not_saved": data.unsaved,
        "batch": {"files": data.files, "since": data.since, "runs": data.runs},
        "last_run": data.last_run, "last_run_unfinished": data.run_note,
        "needs_attention": data.attention,
        "workers": data.worker_rows,
        "bundled_emulator": data.emulated,
        "files": [{k: row.get(k) for k in CSV_FIELDS} for row in data.rows],
    }, indent=2, ensure_ascii=False)


def _link(target: Path, page_dir: Path) -> str:
    """A URL the page can load ``target`` by: relative to the page where one exists, so the
    report and its folder can be moved together."""
    try:
        return quote(os.path.relpath(target, page_dir).replace(os.sep, "/"))
    except ValueError:  # another drive
        return target.as_uri()


def _previews(data: ReportData, out_dir: Path) -> list[dict[str, Any]]:
    """Each saved pair, with its previews made here only where the save did not make them."""
    done = [r for r in data.rows if r["state"] == "done" and r["written_rel"]]
    missing: dict[str, Path] = {}
    for r in done:
        r["out_path"] = out_dir / r["written_rel"]
        for sha, path in ((r["content_sha256"], Path(r["source"])),
                          (r["written_sha256"], r["out_path"])):
            if sha and not thumbnails.path_for(out_dir, sha).exists():
                missing.setdefault(sha, path)
    if missing:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(lambda item: thumbnails.ensure(out_dir, *item), missing.items()))
    return done


def _pairs(done: list[dict[str, Any]], out_dir: Path, page_dir: Path) -> list[dict[str, str]]:
    return [{
        "name": r["rel_path"], "note": r["prepared"] or "",
        "before": _link(thumbnails.path_for(out_dir, r["content_sha256"] or ""), page_dir),
        "after": _link(thumbnails.path_for(out_dir, r["written_sha256"] or ""), page_dir),
        "full_before": Path(r["source"]).as_uri(),
        "full_after": _link(r["out_path"], page_dir),
    } for r in done]


def _batch_header(data: ReportData) -> str:
    """The batch as a whole: every run since its first, what is done, open and lost."""
    e = html.escape
    counts = data.counts
    still_open = sum(counts.get(s.value, 0) for s in JobState
                     if s not in FINAL | NEEDS_ATTENTION)
    bad = sum(counts.get(s.value, 0) for s in NEEDS_ATTENTION) + \
        counts.get("unreadable_files", 0)
    since = f" since {e(data.since)}" if data.since else ""
    figures = [("done", counts.get(JobState.DONE.value, 0), ""),
               ("still open", still_open, " open" if still_open else ""),
               ("failed, rejected or lost", bad, " bad" if bad else ""),
               ("credits charged in all", data.credits_total, "")]
    parts = [f"<p id='batch-summary'>The batch in {e(str(data.out_dir))}: {data.files} "
             f"file(s){since}, {data.runs} run(s).</p><div class='batch' id='batch'>"]
    parts += [f"<div class='figure{cls}'><b>{n}</b>{e(label)}</div>"
              for label, n, cls in figures]
    parts.append("</div>")
    if data.unsaved:
        parts.append(f"<p class='warn' id='not-saved'>{e(unsaved_words(data.unsaved))}.</p>")
    if data.run_note:
        parts.append(f"<p class='warn' id='unfinished-run'>{e(data.run_note)}</p>")
    run = data.last_run
    if run:
        label = "Last finished run" if data.run_note else "Last run"
        parts.append(f"<p class='lastrun'>{label}: {e(str(run.get('started', '')))} to "
                     f"{e(str(run.get('finished', '')))} ({run.get('seconds', 0):.0f} s), "
                     f"exit code {run.get('exit_code')}, credits charged in that run "
                     f"{run.get('charged', 0)}. {e(str(run.get('message') or ''))}</p>")
    return "".join(parts)


def _asset(name: str) -> str:
    return resources.files("batch").joinpath(name).read_text(encoding="utf-8")


VIEWER = (
    "<div id='viewer' role='dialog' aria-label='before and after'><div class='bar'>"
    "<span class='title'></span>"
    "<button type='button' class='mode-side' aria-pressed='true'>side by side</button>"
    "<button type='button' class='mode-slider' aria-pressed='false'>slider</button>"
    "<button type='button' class='prev'>\u2190</button>"
    "<button type='button' class='next'>\u2192</button>"
    "<button type='button' class='close'>close</button></div><div class='stage'>"
    "<div class='side'><div class='label'>before</div><img class='before' alt='before'></div>"
    "<div class='side'><div class='label'>after</div><img class='after' alt='after'></div>"
    "<div class='slider'><img class='before' alt='before'><img class='after' alt='after'>"
    "<span class='label left'>before</span><span class='label right'>after</span>"
    "<input type='range' min='0' max='100' value='50' aria-label='before and after'>"
    "</div></div></div>")


def to_html(data: ReportData, out_dir: Path, page_dir: Path) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>skinbatch report</title><style>{_asset('report_page.css')}</style>"
             "</head><body><h1>skinbatch report</h1>",
             f"<p>Generated {e(data.generated)}.</p>", _batch_header(data)]
    if data.emulated:
        parts.append(f"<p class='warn' id='emulated'>{e(EMULATED_NOTE)}.</p>")
    parts.append("<table class='counts' id='counts'><tr>"
                 + "".join(f"<th>{e(k)}</th>" for k in data.counts)
                 + "<th>credits charged (all runs)</th></tr><tr>"
                 + "".join(f"<td data-state='{e(k)}'>{v}</td>" for k, v in data.counts.items())
                 + f"<td id='credits'>{data.credits_total}</td></tr></table>")
    if data.workers:
        parts.append("<h2>Workers</h2><ul id='workers'>"
                     + "".join(f"<li>{e(w)}</li>" for w in data.workers) + "</ul>")
    if data.attention:
        parts.append("<h2>Needs a person</h2><table id='attention'><tr><th>file</th><th>why</th>"
                     "</tr>" + "".join(f"<tr class='warn'><td>{e(a['source'])}</td>"
                                       f"<td>{e(a['why'])}</td></tr>" for a in data.attention)
                     + "</table>")
    bad = [r for r in data.rows if r["state"] in ("failed", "rejected") or r["problem"]]
    if bad:
        parts.append("<h2>Failed and rejected</h2><table id='problems'><tr><th>file</th>"
                     "<th>state</th><th>reason</th><th>code</th><th>request id</th></tr>")
        for r in bad:
            parts.append(f"<tr class='bad'><td>{e(r['source'])}</td><td>{e(r['state'])}</td>"
                         f"<td>{e(r['reason'])}</td><td>{e(str(r['error_code'] or ''))}</td>"
                         f"<td>{e(str(r['request_id'] or ''))}</td></tr>")
        parts.append("</table>")
    pairs = _pairs(_previews(data, out_dir), out_dir, page_dir)
    # JSON inside a script element: only "</" could end it early.
    payload = json.dumps(pairs, ensure_ascii=False).replace("</", "<\\/")
    parts.append(
        "<h2>Before and after (<span id='shown'></span>)</h2>"
        "<div class='tools'><input id='filter' type='search' placeholder='filter by name'>"
        "<span>Click a pair to compare it at full size (\u2190 \u2192 to move, Esc to close)."
        "</span><span id='pager'></span></div><div id='pairs'></div>"
        f"<script id='pairs-data' type='application/json'>{payload}</script>{VIEWER}"
        f"<script>{_asset('report_page.js')}</script></body></html>")
    return "".join(parts)


def write_report(ledger: Ledger, target: Path, out_dir: Path, fmt: str | None = None) -> Path:
    """Write the report atomically (straight into a pipe or a device); the format follows
    ``fmt`` or the file's suffix."""
    fmt = (fmt or target.suffix.lstrip(".") or "html").lower()
    data = collect(ledger, out_dir)
    text = {"csv": to_csv, "json": to_json}.get(fmt)
    content = text(data) if text else to_html(data, out_dir, target.resolve().parent)
    if target.exists() and not target.is_file():  # a pipe, a terminal, /dev/stdout
        with open(target, "w", encoding="utf-8", errors=SHOWN) as sink:
            sink.write(content)
        return target
    target = target.resolve()  # through a link: the file it names is replaced, not the link
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    try:
        # A folder's name that is not UTF-8 (--out's, in the page's text) is shown escaped.
        temp.write_text(content, encoding="utf-8", errors=SHOWN)
        temp.replace(target)
    except OSError:
        remove_quietly(temp)  # the error to tell is the write's
        raise
    return target
