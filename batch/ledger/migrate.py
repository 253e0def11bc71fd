"""Running the Alembic migrations from code, both from a checkout and from an installed wheel.

Alembic is imported only when a migration has to run: a ledger already at ``HEAD_REVISION``
(every start but the first after an upgrade) is recognised with one query, which keeps the
start-up of every command about a tenth of a second shorter.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest migration in ``migrations/versions`` (a test keeps the two in step).
HEAD_REVISION = "0006"


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


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.execution_options(readonly=True).connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:
        return None  # a new, empty ledger


#: The advisory lock that lets one worker at a time migrate a shared PostgreSQL ledger.
MIGRATION_LOCK = 0x736B696E6D696772  # "skinmigr"


def upgrade_to_head(engine: Engine) -> None:
    if current_revision(engine) == HEAD_REVISION:
        return
    from alembic import command

    if engine.dialect.name != "postgresql":  # SQLite: the run's file lock is held already
        command.upgrade(alembic_config(engine), "head")
        return
    # Workers started together on a new ledger: the first migrates, the others wait for it.
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        conn.commit()
        try:
            if current_revision(engine) != HEAD_REVISION:
                command.upgrade(alembic_config(engine), "head")
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            conn.commit()
