"""Recording a scan's rows: staged in a scratch table, then moved by ``INSERT ... SELECT``.

A first scan records every file of the tree and creates a job for every distinct content:
two inserts per file, the ledger's one writer busy with nothing else. Run once per row
(``executemany``), each insert costs the driver a statement step and a parameter binding per
row, and the files' insert a sub-select of the job for each. Bound once into a table with no
index and moved by two ``INSERT ... SELECT`` statements, the rows are bound once and the rest
runs inside the database: 100,000 files in 0.72 s of CPU instead of 0.93 s on SQLite.

The scratch table is the connection's own: SQLite keeps it in an in-memory database attached
to every connection as ``staging`` (not ``temp``: ``PRAGMA temp_store=MEMORY`` would also keep
every big sort in memory); PostgreSQL in a temporary table, emptied at each commit. Either
way it is empty between transactions, and a crash loses nothing in it that the ledger holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    literal,
    select,
    true,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable

from batch.ledger.driver import Cursor, Statement
from batch.ledger.models import files, jobs
from batch.scanrows import SCAN_ROW, ScanRow
from batch.states import JobState

#: The schema of SQLite's in-memory scratch database (see :func:`attach_staging`).
SQLITE_STAGING = "staging"


def attach_staging(execute: Callable[[str], object]) -> None:
    """Attach SQLite's scratch database to a new connection (outside any transaction)."""
    execute(f"ATTACH DATABASE ':memory:' AS {SQLITE_STAGING}")


def _staging_table(dialect: str) -> Table:
    """Rows laid out as :data:`SCAN_ROW`, numbered in the order they came (the jobs' ids
    follow it, so photos are sent in the order they were found)."""
    types = {"size_bytes": BigInteger, "mtime_ns": BigInteger, "seen_at": Float}
    columns: list[Column[object]] = [Column(name, types.get(name, Text)) for name in SCAN_ROW]
    if dialect == "sqlite":
        return Table("scan_rows", MetaData(), Column("seq", Integer, primary_key=True),
                     *columns, schema=SQLITE_STAGING)
    return Table("scan_rows", MetaData(), Column("seq", Integer, primary_key=True), *columns,
                 prefixes=["TEMPORARY"], postgresql_on_commit="DELETE ROWS")


class ScanRecorder:
    """The statements that record scan rows, compiled once for ``engine``'s dialect."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect.name
        staged = _staging_table(dialect)
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        s = staged.c
        self._create = Statement(engine, CreateTable(staged, if_not_exists=True))
        self._stage = Statement(engine, staged.insert().values(
            {name: bindparam(name) for name in SCAN_ROW}))
        self._clear = Statement(engine, staged.delete())
        new_jobs = select(s.content_sha256, s.options_fp, s.size_bytes,
                          literal(JobState.PENDING.value), s.seen_at, s.seen_at, literal(0.0),
                          literal(0), literal(0)
                          ).where(s.content_sha256.is_not(None)).order_by(s.seq)
        self._insert_jobs = Statement(engine, insert(jobs).from_select(
            ["content_sha256", "options_fp", "size_bytes", "state", "created_at", "updated_at",
             "next_attempt_at", "attempts", "charges"], new_jobs
        ).on_conflict_do_nothing(index_elements=["content_sha256", "options_fp"]))
        job_of_row = select(jobs.c.id).where(jobs.c.content_sha256 == s.content_sha256,
                                             jobs.c.options_fp == s.options_fp
                                             ).scalar_subquery()
        moved = ("root", "rel_path", "out_rel", "size_bytes", "mtime_ns", "content_sha256",
                 "problem", "seen_at")
        # The WHERE keeps SQLite from reading ON CONFLICT as the ON of a join.
        upsert = insert(files).from_select(
            [*moved, "job_id"],
            select(*(s[name] for name in moved), job_of_row).where(true()).order_by(s.seq))
        self._upsert_files = Statement(engine, upsert.on_conflict_do_update(
            index_elements=["root", "rel_path"],
            set_={c: upsert.excluded[c] for c in ("out_rel", "size_bytes", "mtime_ns",
                                                  "content_sha256", "job_id", "problem",
                                                  "seen_at")}))

    def record(self, cur: Cursor, rows: Sequence[ScanRow]) -> int:
        """Record ``rows`` in the transaction of ``cur``: upsert each file (by root and
        relative path; each at most once in ``rows``) and link a readable one to its job
        (content + options), creating jobs as needed. Returns how many were created."""
        cur.execute(self._create)
        cur.executemany(self._stage, SCAN_ROW, rows)
        created = cur.execute(self._insert_jobs)
        cur.execute(self._upsert_files)
        cur.execute(self._clear)
        return created
