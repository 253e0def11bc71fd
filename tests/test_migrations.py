"""Migrations from empty must yield exactly the declared schema (as procrastinate checks), and a
new ledger, made from the declared schema without Alembic, exactly what the migrations make."""

import re
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import DBAPIError

from batch.emulator import Emulator
from batch.ledger import LedgerUnavailable, open_ledger
from batch.ledger.engine import create_ledger_engine
from batch.ledger.migrate import HEAD_REVISION, alembic_config, current_revision
from batch.ledger.models import metadata
from tests.conftest import run_cli
from tests.imagegen import write_portrait


def _beyond_the_models(conn: Connection) -> dict[str, Any]:
    """What a comparison with the models does not see: CHECK constraints, the trigger that
    guards job states (and its function), Alembic's own table and the revision it goes on
    from."""
    inspector = inspect(conn)
    versions = ([(c["name"], str(c["type"]), c["nullable"])
                 for c in inspector.get_columns("alembic_version")],
                inspector.get_pk_constraint("alembic_version"))
    checks = {table: sorted((c["name"], c["sqltext"])
                            for c in inspector.get_check_constraints(table))
              for table in inspector.get_table_names()}
    if conn.dialect.name == "sqlite":
        triggers = conn.execute(text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name")).all()
    else:
        triggers = conn.execute(text(
            "SELECT tgname, pg_get_triggerdef(t.oid), p.prosrc FROM pg_trigger t "
            "JOIN pg_proc p ON p.oid = t.tgfoid WHERE NOT tgisinternal ORDER BY tgname")).all()
    version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return {"checks": checks, "triggers": [tuple(row) for row in triggers],
            "versions table": versions, "version": version}


def test_migrations_from_empty_equal_the_models_and_a_new_ledger(ledger_location: str) -> None:
    engine = create_ledger_engine(ledger_location)
    command.upgrade(alembic_config(engine), "head")
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        migrated = _beyond_the_models(conn)
        tables = set(inspect(conn).get_table_names())
    if engine.dialect.name == "sqlite":
        fresh_location = ledger_location + ".new"
    else:  # the same database, emptied
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        fresh_location = ledger_location
    engine.dispose()
    assert {"jobs", "files", "events", "meta", "alembic_version"} <= tables
    assert migrated["version"] == HEAD_REVISION and migrated["triggers"]
    assert migrated["checks"]["jobs"], "the CHECK on job states"

    ledger = open_ledger(fresh_location)
    try:
        with ledger.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            assert _beyond_the_models(conn) == migrated
            assert set(inspect(conn).get_table_names()) == tables
        assert current_revision(ledger.engine) == HEAD_REVISION
    finally:
        ledger.close()


def test_opening_twice_is_a_no_op(ledger_location: str) -> None:
    open_ledger(ledger_location).close()
    ledger = open_ledger(ledger_location)
    assert ledger.counts()["pending"] == 0
    ledger.close()


def test_sqlite_ledger_is_wal_and_private(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = open_ledger(str(path))
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    ledger.close()
    assert path.stat().st_mode & 0o077 == 0


def test_the_head_revision_the_fast_path_trusts_is_the_newest_migration(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    ledger = open_ledger(tmp_path / "l.sqlite")
    try:
        script = ScriptDirectory.from_config(alembic_config(ledger.engine))
        assert script.get_current_head() == HEAD_REVISION
        assert current_revision(ledger.engine) == HEAD_REVISION
    finally:
        ledger.close()


def insert_waiting_job(conn: Connection) -> None:
    """Job 1, pending, written as a ledger of any earlier revision holds it."""
    conn.execute(text(
        "INSERT INTO jobs (id, content_sha256, options_fp, size_bytes, state, created_at, "
        "updated_at, next_attempt_at, attempts, charges) "
        "VALUES (1, :sha, '100000000', 5, 'pending', 0, 0, 0, 0, 0)"), {"sha": "e" * 64})


def test_a_ledger_with_jobs_keeps_identifying_photos_by_their_files(ledger_location: str) -> None:
    """Photos are identified by their image (a caption written in does not pay again), but a
    ledger that had jobs keyed by the whole file keeps that key: re-keyed, a copy of a photo
    it paid for would be paid for again. One that had none takes the new key."""
    engine = create_ledger_engine(ledger_location)
    command.upgrade(alembic_config(engine), "0006")
    engine.dispose()
    empty = open_ledger(ledger_location)
    try:
        assert empty.image_identity
    finally:
        empty.close()
    engine = create_ledger_engine(ledger_location)
    command.downgrade(alembic_config(engine), "0006")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM meta"))
        insert_waiting_job(conn)
    engine.dispose()
    paid_before = open_ledger(ledger_location)
    try:
        assert not paid_before.image_identity
        assert current_revision(paid_before.engine) == HEAD_REVISION
    finally:
        paid_before.close()


@pytest.mark.parametrize(("before", "source", "target"), [
    ("0007", "pending", "done"),  # a waiting photo whose result is copied from elsewhere
    ("0009", "failed", "ready"),  # a paid result whose download failed, fetched again
])
def test_an_upgraded_ledger_allows_the_moves_added_since(
        ledger_location: str, before: str, source: str, target: str) -> None:
    """A ledger made before a move was legal refuses it in its trigger; the upgrade lets that
    move through, and the downgrade refuses it again."""
    engine = create_ledger_engine(ledger_location)
    config = alembic_config(engine)
    command.upgrade(config, before)

    def allowed() -> bool:
        with engine.connect() as conn:
            conn.execute(text("DELETE FROM jobs"))
            insert_waiting_job(conn)
            if source != "pending":
                conn.execute(text("UPDATE jobs SET state = :s WHERE id = 1"), {"s": source})
            conn.commit()
            try:
                conn.execute(text("UPDATE jobs SET state = :s WHERE id = 1"), {"s": target})
                conn.commit()
            except DBAPIError:
                conn.rollback()
                return False
            return True

    try:
        assert not allowed()
        command.upgrade(config, "head")
        assert allowed()
        command.downgrade(config, before)
        assert not allowed()
    finally:
        engine.dispose()


def test_a_ledger_a_newer_version_migrated_is_refused_as_it_is(ledger_location: str) -> None:
    """A ledger migrated by a newer skinbatch (another machine sharing it, or this one before a
    downgrade) is refused with what to do, and left at its revision; so is a database whose
    Alembic revision is another program's."""
    open_ledger(ledger_location).close()
    engine = create_ledger_engine(ledger_location)
    newer = f"{int(HEAD_REVISION) + 1:04d}"
    try:
        for revision, words in ((newer, f"written by a newer skinbatch (its schema is at "
                                        f"revision {newer}; this one knows up to "
                                        f"{HEAD_REVISION}): upgrade skinbatch"),
                                ("ae1027a6acf", "belongs to another program")):
            with engine.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
            with pytest.raises(LedgerUnavailable, match=re.escape(words)):
                open_ledger(ledger_location)
            assert current_revision(engine) == revision
    finally:
        engine.dispose()


def test_a_run_on_a_newer_ledger_sends_nothing(tmp_path: Path, emulator: Emulator) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    write_portrait(source / "a.jpg")
    assert run_cli(["run", str(source), "--out", str(out), "--smart-skin"], emulator
                   ).returncode == 0
    write_portrait(source / "b.jpg", seed=1)
    engine = create_ledger_engine(out / ".skinbatch" / "ledger.sqlite")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for command_line in (["run", str(source), "--out", str(out), "--smart-skin"],
                         ["status", "--out", str(out)]):
        result = run_cli(command_line, emulator)
        assert result.returncode == 2, result.stderr
        assert "written by a newer skinbatch" in result.stderr
        assert "Traceback" not in result.stderr
    assert emulator.stats["submits"] == 1
    assert not (out / "b.jpg").exists()
