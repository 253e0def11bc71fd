"""The ledger's tables. Alembic migrations must produce exactly this schema (a test checks)."""

from __future__ import annotations

from typing import cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
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
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from batch.ledger.guards import STATE_CHECK

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    """One paid unit of work: a distinct image content under one set of options."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("content_sha256", "options_fp"),
        Index("ix_jobs_state_next_attempt_at", "state", "next_attempt_at"),
        CheckConstraint(STATE_CHECK, name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_sha256: Mapped[str] = mapped_column(String(64))
    options_fp: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    #: When a waiting job may be tried again (backoff after a transient error).
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    #: Transient failures in the current stage; reset when the stage succeeds.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Uploads that reached (or may have reached) the provider: each may have cost credits.
    charges: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(128))
    result_urls: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    result_sha256: Mapped[str | None] = mapped_column(String(64))
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(128))
    log_id: Mapped[str | None] = mapped_column(String(128))
    #: What was done to the file before upload (resized, rotated, converted), if anything.
    prepared: Mapped[str | None] = mapped_column(Text)


class SourceFile(Base):
    """A file found under a source folder, and where its output goes."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("root", "rel_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root: Mapped[str] = mapped_column(Text)
    rel_path: Mapped[str] = mapped_column(Text)
    #: Output path relative to --out, as planned at scan time (extension may follow the result).
    out_rel: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    #: The output actually written (relative to --out) and its content hash.
    written_rel: Mapped[str | None] = mapped_column(Text)
    written_sha256: Mapped[str | None] = mapped_column(String(64))
    #: A problem with this file itself (unreadable, output conflict), in plain words.
    problem: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[float] = mapped_column(Float)


class Event(Base):
    """History: one row per transition or attempt, never updated."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    log_id: Mapped[str | None] = mapped_column(String(128))
    message: Mapped[str | None] = mapped_column(Text)


class Meta(Base):
    """Small key/value facts about the ledger (which output folder it serves, etc.)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Folder(Base):
    """A source folder as last scanned, summed up in one digest of its files' names, sizes,
    mtimes and inodes and the settings that apply there. A re-scan that computes the
    same digest knows every file in it is already recorded, without a lookup per file. Only
    folders whose every file was recorded without a problem get one."""

    __tablename__ = "folders"

    root: Mapped[str] = mapped_column(Text, primary_key=True)
    rel_dir: Mapped[str] = mapped_column(Text, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    #: Image files in it (what a skipped folder adds to the scan's counts).
    images: Mapped[int] = mapped_column(Integer)


jobs = cast(Table, Job.__table__)
files = cast(Table, SourceFile.__table__)
events = cast(Table, Event.__table__)
meta = cast(Table, Meta.__table__)
folders = cast(Table, Folder.__table__)
