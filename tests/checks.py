"""Assertions about what a user would see after a run: files, bytes, ledger rows, requests."""

from __future__ import annotations

import hashlib
import io
import socket
from pathlib import Path

from PIL import Image

from batch.emulator import Emulator
from batch.ledger import Ledger, open_ledger
from batch.states import JobState


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def uploaded_image(body: bytes) -> bytes:
    """The image part of a raw multipart upload."""
    boundary = body.split(b"\r\n", 1)[0]
    for part in body.split(boundary):
        head, _, content = part.partition(b"\r\n\r\n")
        if b'name="image"' in head:
            return content[:-2]  # the CRLF before the next boundary
    raise AssertionError("no image in the upload")


def results_by_source(emulator: Emulator) -> dict[str, list[bytes]]:
    """Every result the emulator produced, keyed by the sha256 of the uploaded source."""
    found: dict[str, list[bytes]] = {}
    for task in emulator.state.tasks.values():
        if task.result is not None:
            found.setdefault(task.source_sha256, []).append(task.result)
    return found


def assert_outputs_right(out: Path, sources: dict[str, bytes], emulator: Emulator) -> None:
    """Each source has its output at the same relative path: exactly a result the API served
    for that content, a decodable image of the same size, and no temp files anywhere."""
    results = results_by_source(emulator)
    for rel, data in sources.items():
        target = out / rel
        assert target.is_file(), f"missing output {rel}"
        produced = target.read_bytes()
        assert produced in results.get(sha(data), []), f"{rel} is not the API's result"
        with Image.open(io.BytesIO(produced)) as result, Image.open(io.BytesIO(data)) as source:
            assert result.size == source.size
            result.load()
    leftovers = [p for p in out.rglob("*") if ".skinbatch-" in p.name]
    assert leftovers == [], f"temp files left: {leftovers}"


def ledger_of(out: Path, location: str | None = None) -> Ledger:
    """The run's ledger: ``location`` (a --ledger given) or the default one under ``out``."""
    return open_ledger(location or out / ".skinbatch" / "ledger.sqlite")


def assert_no_double_pay(out: Path, emulator: Emulator, distinct: int,
                         location: str | None = None) -> int:
    """Charges seen by the server never exceed images + uploads the ledger marks ambiguous
    (+ expired resubmits). Returns the ambiguous count."""
    ledger = ledger_of(out, location)
    try:
        ambiguous = ledger.ambiguous_events()
        expired = sum(1 for j in ledger.jobs_in(list(JobState))
                      for h in ledger.history(j.id) if h["to_state"] == "expired")
        charged_per_ledger = ledger.charges()
    finally:
        ledger.close()
    charged = emulator.stats.get("charged", 0)
    assert charged <= distinct + ambiguous + expired, (charged, distinct, ambiguous, expired)
    assert charged <= charged_per_ledger, "the server charged for an upload the ledger never saw"
    return ambiguous


def assert_ledger_sound(out: Path, location: str | None = None) -> dict[str, int]:
    """integrity_check ok (SQLite), every job in a known state, every history row a legal
    transition."""
    from batch.states import check_transition

    ledger = ledger_of(out, location)
    try:
        if ledger.engine.dialect.name == "sqlite":
            with ledger.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        transitions = 0
        for job in ledger.jobs_in(list(JobState)):
            for event in ledger.history(job.id):
                if event["from_state"] != event["to_state"]:
                    check_transition(job.id, event["from_state"], JobState(event["to_state"]))
                    transitions += 1
        return {"transitions": transitions, "ambiguous": ledger.ambiguous_events(),
                **{k: v for k, v in ledger.counts().items() if v}}
    finally:
        ledger.close()


def closed_port() -> int:
    """A loopback port nothing listens on (taken from the system, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
