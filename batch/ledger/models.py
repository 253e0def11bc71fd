"""The ledger's tables, in SQLAlchemy Core. Alembic migrations must produce exactly this schema
(a test checks)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from batch.ledger.guards import STATE_CHECK

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}
metadata = MetaData(naming_convention=NAMING)


def _nullable(name: str, kind: type | object) -> Column[object]:
    return Column(name, kind, nullable=True)  # type: ignore[arg-type]


def _required(name: str, kind: type | object, **kwargs: object) -> Column[object]:
    return Column(name, kind, nullable=False, **kwargs)  # type: ignore[arg-type]


#: One paid unit of work: a distinct image content under one set of options.
jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True),
    _required("content_sha256", String(64)),
    _required("options_fp", String(16)),
    _required("size_bytes", BigInteger),
    _required("state", String(16)),
    _required("created_at", Float),
    _required("updated_at", Float),
    # When a waiting job may be tried again (backoff after a transient error).
    _required("next_attempt_at", Float, default=0.0),
    # Transient failures in the current stage; reset when the stage succeeds.
    _required("attempts", Integer, default=0),
    # Uploads that reached (or may have reached) the provider: each may have cost credits.
    _required("charges", Integer, default=0),
    _nullable("task_id", String(128)),
    _nullable("result_urls", Text),
    _nullable("submitted_at", Float),
    _nullable("expires_at", Float),
    _nullable("result_sha256", String(64)),
    _nullable("http_status", Integer),
    _nullable("error_code", String(64)),
    _nullable("reason", Text),
    _nullable("request_id", String(128)),
    _nullable("log_id", String(128)),
    # What was done to the file before upload (resized, rotated, converted), if anything.
    _nullable("prepared", Text),
    # The metadata removed from it before upload, by kind ("EXIF, XMP 2"), if any.
    _nullable("stripped", Text),
    # The worker holding the job on a shared (PostgreSQL) ledger; None: anyone may take it.
    _nullable("owner", String(128)),
    # Set (``skinbatch dismiss``) when a person accepts a failed or rejected job unretouched,
    # so that a photo that will never be retouched does not fail every night; cleared when
    # the job is put back in line.
    _nullable("dismissed_at", Float),
    UniqueConstraint("content_sha256", "options_fp"),
    Index("ix_jobs_state_next_attempt_at", "state", "next_attempt_at"),
    Index("ix_jobs_owner", "owner"),
    CheckConstraint(STATE_CHECK, name="state"),
)

#: A file found under a source folder, and where its output goes.
files = Table(
    "files", metadata,
    Column("id", Integer, primary_key=True),
    _required("root", Text),
    _required("rel_path", Text),
    # Output path relative to --out, as planned at scan time (extension may follow the result).
    _required("out_rel", Text),
    _required("size_bytes", BigInteger),
    _required("mtime_ns", BigInteger),
    _nullable("content_sha256", String(64)),
    Column("job_id", ForeignKey("jobs.id"), nullable=True, index=True),
    # The output actually written (relative to --out) and its content hash.
    _nullable("written_rel", Text),
    _nullable("written_sha256", String(64)),
    # A problem with this file itself (unreadable, output conflict), in plain words.
    _nullable("problem", Text),
    _required("seen_at", Float),
    UniqueConstraint("root", "rel_path"),
)

#: History: one row per transition or attempt, never updated.
events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False, index=True),
    _required("at", Float),
    _nullable("from_state", String(16)),
    _required("to_state", String(16)),
    _required("attempt", Integer, default=0),
    _nullable("http_status", Integer),
    _nullable("error_code", String(64)),
    _nullable("request_id", String(128)),
    _nullable("log_id", String(128)),
    _nullable("message", Text),
    # The worker that made the move (on a shared ledger: which machine did what).
    _nullable("worker", String(128)),
)

#: Small key/value facts about the ledger (the last run, etc.).
meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    _required("value", Text),
)

#: A source folder as last scanned, summed up in one digest of its files' names, sizes,
#: mtimes and inodes and the settings that apply there. A re-scan that computes the same
#: digest knows every file in it is already recorded, without a lookup per file. Only folders
#: whose every file was recorded without a problem get one.
folders = Table(
    "folders", metadata,
    Column("root", Text, primary_key=True),
    Column("rel_dir", Text, primary_key=True),
    _required("digest", String(64)),
    # Image files in it (what a skipped folder adds to the scan's counts).
    _required("images", Integer),
)

#: A run working on the ledger (several on one PostgreSQL ledger share the jobs). Its lease
#: lives while ``heartbeat_at`` (the database's clock) is younger than ``lease_seconds``.
workers = Table(
    "workers", metadata,
    Column("name", String(128), primary_key=True),
    _required("host", Text),
    _required("pid", Integer),
    _required("started_at", Float),
    _required("heartbeat_at", Float),
    _required("lease_seconds", Float),
    # A clean end; its jobs were handed back.
    _nullable("stopped_at", Float),
    # The worker that took this one's jobs over once its lease lapsed, when, and how many.
    _nullable("taken_over_by", String(128)),
    _nullable("taken_over_at", Float),
    _nullable("taken_over_jobs", Integer),
)

#: The API's requests shared by every worker of a ledger under one ``--max-qps``: the next free
#: moment (the database's clock) for a request to the API host, as in a virtual-time scheduler.
api_slots = Table(
    "api_slots", metadata,
    Column("api_base", String(255), primary_key=True),
    _required("next_at", Float),
)
