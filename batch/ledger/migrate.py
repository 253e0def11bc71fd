"""Bringing a ledger to the newest schema: Alembic's migrations from code (from a checkout and
from an installed wheel) for a ledger that has tables, the declared schema for a new one.

Alembic is imported only when a migration has to run: a ledger already at ``HEAD_REVISION``
(every start but the first after an upgrade) is recognised with one query, and a new, empty
one gets the declared tables, the state guards and the head revision in one transaction,
which is what the migrations build (a test compares the two). Loading Alembic and running
every migration would cost a newcomer's first run a fifth of a second before its first
upload.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from batch.ledger.guards import create_trigger_sql
from batch.ledger.models import metadata

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest migration in ``migrations/versions`` (a test keeps the two in step).
HEAD_REVISION = "0010"


def migrations_dir() -> Path:
    """The wheel ships ``migrations/`` as ``batch/_migrations``; a checkout has it at the top."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_migrations"
    return packaged if packaged.is_dir() else here.parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["engine"] = engine
    return config


class NewerLedger(Exception):
    """The ledger's schema is at a revision this version does not know: a newer skinbatch
    migrated it (another machine sharing it, or this one before a downgrade), or another
    program's Alembic owns the database. Opened as it is, its rows could be misread."""

    def __init__(self, revision: str) -> None:
        super().__init__(revision)
        self.revision = revision

    def __str__(self) -> str:
        if self.revision.isdigit() and int(self.revision) > int(HEAD_REVISION):
            return (f"it was written by a newer skinbatch (its schema is at revision "
                    f"{self.revision}; this one knows up to {HEAD_REVISION}): upgrade skinbatch "
                    "on this machine to the version that migrated it")
        return (f"its database belongs to another program (Alembic revision {self.revision}, "
                "not a skinbatch ledger's): give the ledger a database of its own")


def known_revisions() -> set[str]:
    """The revisions of ``migrations/versions``, from their file names (``0003_...py``)."""
    return {path.name.split("_", 1)[0] for path in (migrations_dir() / "versions").glob("*_*.py")}


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.execution_options(readonly=True).connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:
        return None  # a new, empty ledger


#: The advisory lock that lets one worker at a time migrate a shared PostgreSQL ledger.
MIGRATION_LOCK = 0x736B696E6D696772  # "skinmigr"


def upgrade_to_head(engine: Engine) -> None:
    """Raises :class:`NewerLedger` for a schema this version does not know."""
    if current_revision(engine) == HEAD_REVISION:
        return
    if engine.dialect.name != "postgresql":  # SQLite: the run's file lock is held already
        _upgrade(engine)
        return
    # Workers started together on a new ledger: the first migrates, the others wait for it.
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        conn.commit()
        try:
            if current_revision(engine) != HEAD_REVISION:
                _upgrade(engine)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            conn.commit()


def _upgrade(engine: Engine) -> None:
    revision = current_revision(engine)
    if revision is not None and revision not in known_revisions():
        raise NewerLedger(revision)
    with engine.begin() as conn:
        if not inspect(conn).get_table_names():
            _create_head_schema(conn)
            return
    from alembic import command

    command.upgrade(alembic_config(engine), "head")


def _create_head_schema(conn: Connection) -> None:
    """The newest schema on an empty database, as the migrations would leave it."""
    metadata.create_all(conn)
    for statement in create_trigger_sql(conn.dialect.name):
        conn.execute(text(statement))
    # Alembic's own table, as it creates it (a test compares the two), so that later
    # migrations start from here; importing Alembic to create it would cost most of the time
    # this path saves.
    conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                         "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))")
    conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"),
                 {"head": HEAD_REVISION})
