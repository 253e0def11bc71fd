"""The morning report: a self-contained HTML page (before/after thumbnails), CSV or JSON."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from batch.ledger import Ledger
from batch.options import Options
from batch.states import IN_FLIGHT, JobState

THUMB = 160
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


def collect(ledger: Ledger) -> ReportData:
    rows = ledger.report_rows()
    now = time.time()
    attention = []
    for row in rows:
        path = f"{row['root'].rstrip('/')}/{row['rel_path']}"
        row["source"] = path
        row["options"] = Options.from_fingerprint(row["options_fp"]).describe() \
            if row["options_fp"] else ""
        row["state"] = row["state"] or "rejected"
        row["reason"] = row["problem"] or row["reason"] or ""
        expires = row["expires_at"]
        row["expires"] = datetime.fromtimestamp(expires).isoformat(timespec="minutes") \
            if expires else ""
        if row["state"] == JobState.AMBIGUOUS.value:
            attention.append({"source": path, "why": "upload answer lost (may be charged): "
                                                     "skinbatch retry --ambiguous to resend"})
        elif row["state"] in IN_FLIGHT:
            soon = " (soon!)" if expires and expires - now < EXPIRING_SOON else ""
            attention.append({"source": path, "why": f"paid, result not saved yet: run again "
                                                     f"before its link expires {row['expires']}"
                                                     f"{soon}"})
        elif row["state"] == JobState.EXPIRED.value:
            attention.append({"source": path, "why": "result link expired before it was saved"})
    last_run = json.loads(ledger.get_meta("last_run") or "{}")
    return ReportData(datetime.now().astimezone().isoformat(timespec="seconds"),
                      {k: v for k, v in ledger.counts().items() if v}, ledger.charges(),
                      last_run, rows, attention)


CSV_FIELDS = ["source", "written_rel", "state", "reason", "error_code", "http_status",
              "request_id", "log_id", "charges", "expires", "options"]


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
        "last_run": data.last_run, "needs_attention": data.attention,
        "files": [{k: row.get(k) for k in CSV_FIELDS} for row in data.rows],
    }, indent=2, ensure_ascii=False)


def thumbnail(path: Path) -> str | None:
    """A small JPEG as a data: URI, or None when the file cannot be read."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMB * 2, THUMB * 2))
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=70)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} table{border-collapse:collapse;margin:8px 0 24px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
.counts td{font-size:18px} .pair{display:inline-block;margin:6px;text-align:center;width:340px}
.pair img{width:160px;height:auto;margin:2px;border:1px solid #ccc}
.pair .name{font-size:12px;word-break:break-all} .bad{color:#a00} .warn{background:#fff4d6}
"""


def to_html(data: ReportData, out_dir: Path) -> str:
    e = html.escape
    run = data.last_run
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>skinbatch report</title>"
             f"<style>{STYLE}</style></head><body><h1>skinbatch report</h1>",
             f"<p>Generated {e(data.generated)}."]
    if run:
        parts.append(f" Last run: {e(str(run.get('started', '')))} to "
                     f"{e(str(run.get('finished', '')))} ({run.get('seconds', 0):.0f} s), "
                     f"exit code {run.get('exit_code')}, credits charged in that run "
                     f"{run.get('charged', 0)}. {e(str(run.get('message') or ''))}")
    parts.append("</p><table class='counts' id='counts'><tr>"
                 + "".join(f"<th>{e(k)}</th>" for k in data.counts)
                 + "<th>credits charged (all runs)</th></tr><tr>"
                 + "".join(f"<td data-state='{e(k)}'>{v}</td>" for k, v in data.counts.items())
                 + f"<td id='credits'>{data.credits_total}</td></tr></table>")
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
    done = [r for r in data.rows if r["state"] == "done" and r["written_rel"]]
    parts.append(f"<h2>Before and after ({len(done)})</h2><div id='pairs'>")
    for r in done:
        before = thumbnail(Path(r["source"]))
        after = thumbnail(out_dir / r["written_rel"])
        images = "".join(f"<img class='thumb' alt='{label}' src='{uri}'>"
                         for label, uri in (("before", before), ("after", after)) if uri)
        parts.append(f"<div class='pair'>{images}<div class='name'>{e(r['rel_path'])}</div>"
                     "</div>")
    parts.append("</div></body></html>")
    return "".join(parts)


def write_report(ledger: Ledger, target: Path, out_dir: Path, fmt: str | None = None) -> Path:
    """Write the report atomically; the format follows ``fmt`` or the file's suffix."""
    fmt = (fmt or target.suffix.lstrip(".") or "html").lower()
    data = collect(ledger)
    text = {"csv": to_csv, "json": to_json}.get(fmt)
    content = text(data) if text else to_html(data, out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    temp.write_text(content, encoding="utf-8")
    temp.replace(target)
    return target
