"""Migrations from empty must yield exactly the declared schema (as procrastinate checks)."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from batch.ledger import open_ledger
from batch.ledger.models import metadata


def test_upgrade_head_on_an_empty_ledger_equals_the_models(ledger_location: str) -> None:
    ledger = open_ledger(ledger_location)
    try:
        with ledger.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        ledger.close()
    assert diff == []
    assert {"jobs", "files", "events", "meta", "alembic_version"} <= tables


def test_opening_twice_is_a_no_op(ledger_location: str) -> None:
    open_ledger(ledger_location).close()
    ledger = open_ledger(ledger_location)
    assert ledger.counts()["pending"] == 0
    ledger.close()


def test_sqlite_ledger_is_wal_and_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "l.sqlite"
    ledger = open_ledger(str(path))
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    ledger.close()
    assert path.stat().st_mode & 0o077 == 0


def test_the_head_revision_the_fast_path_trusts_is_the_newest_migration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from alembic.script import ScriptDirectory

    from batch.ledger.migrate import HEAD_REVISION, alembic_config, current_revision

    ledger = open_ledger(tmp_path / "l.sqlite")
    try:
        script = ScriptDirectory.from_config(alembic_config(ledger.engine))
        assert script.get_current_head() == HEAD_REVISION
        assert current_revision(ledger.engine) == HEAD_REVISION
    finally:
        ledger.close()
