"""Opening a ledger: engine settings per backend, migrations, and filesystem sanity checks."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from batch.ledger.migrate import NewerLedger, upgrade_to_head
from batch.ledger.store import Ledger

NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph", "glusterfs",
     "fuse.glusterfs", "lustre", "davfs", "fuse.rclone", "fuse.s3fs"}
)
#: What the SQLite write-ahead log is cut back to when reused after a checkpoint (bytes).
WAL_SIZE_LIMIT = 16 * 1024 * 1024


class LedgerUnavailable(RuntimeError):
    """The ledger cannot be opened at all (a server down, a driver missing, a file another
    user owns, not a ledger): said in one sentence before anything is sent."""


def ledger_url(location: str | Path) -> str:
    """A SQLAlchemy URL for a file path or a database URL (``postgresql://`` uses psycopg 3)."""
    text = str(location)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    url = make_url(text)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    elif not url.drivername.startswith(("sqlite", "postgresql")):
        raise LedgerUnavailable(f"{shown(text)} cannot hold a ledger: give a SQLite file (a "
                                "path) or a PostgreSQL database (postgresql://...)")
    return url.render_as_string(hide_password=False)


def filesystem_type(path: Path, mounts_table: str | None = None) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/mounts (None where unknown)."""
    try:
        mounts = (mounts_table if mounts_table is not None
                  else Path("/proc/mounts").read_text()).splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The begin hook below issues BEGIN itself, so writers take the lock up front
        # (BEGIN IMMEDIATE) instead of failing mid-transaction on lock upgrade.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Straight on the driver's connection: these statements return nothing, and the
        # stages begin several transactions per image.
        driver = connection.connection.dbapi_connection
        options = connection.get_execution_options()
        if options.get("readonly", False):
            driver.execute("BEGIN")
            return
        # Durability per transaction (Ledger._write decides it): NORMAL commits without an
        # fsync; the next FULL commit's fsync of the WAL makes the earlier ones durable too.
        synchronous = "FULL" if options.get("durable", True) else "NORMAL"
        info = connection.connection.info
        if info.get("synchronous", "FULL") != synchronous:
            driver.execute(f"PRAGMA synchronous={synchronous}")
            info["synchronous"] = synchronous
        driver.execute("BEGIN IMMEDIATE")

    return engine


#: PostgreSQL's read_only_sql_transaction: the server takes no writes now (a standby after
#: a failover, a database set read-only for maintenance).
READ_ONLY_SQLSTATE = "25006"


def _postgresql_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)

    @event.listens_for(engine, "handle_error")
    def _read_only_is_a_disconnect(context: Any) -> None:
        # Its connections are dropped, as for a server gone, and the write is waited for
        # (Ledger.away): a new connection reaches the primary again once the failover is over.
        if getattr(context.original_exception, "sqlstate", None) == READ_ONLY_SQLSTATE:
            context.is_disconnect = True

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if not connection.get_execution_options().get("durable", True):
            connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    return engine


def create_ledger_engine(location: str | Path) -> Engine:
    url = ledger_url(location)
    if not url.startswith("sqlite"):
        return _postgresql_engine(url)
    database = make_url(url).database
    assert database is not None
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    return _sqlite_engine(url)


def open_ledger(location: str | Path, *, name: str | Path | None = None) -> Ledger:
    """Open (creating and migrating as needed) the ledger at a path or database URL; ``name``
    is what its messages call it (the dry run opens a copy)."""
    try:
        engine = create_ledger_engine(location)
    except ModuleNotFoundError as missing:
        raise LedgerUnavailable(f"a PostgreSQL ledger needs the {missing.name} driver: pip "
                                "install 'skinbatch[postgres]'") from None
    except ArgumentError as exc:
        raise LedgerUnavailable(f"{location} is not a ledger file or database URL: "
                                f"{exc}") from None
    try:
        _refuse_if_damaged(engine, name or location)
        upgrade_to_head(engine)
        if engine.dialect.name == "sqlite" and engine.url.database:
            _keep_private(engine.url.database)
    except NewerLedger as exc:
        engine.dispose()
        raise LedgerUnavailable(f"cannot use the ledger {shown(name or location)}: {exc}; "
                                "nothing was sent") from None
    except (DBAPIError, PermissionError) as exc:
        engine.dispose()
        why = str(exc.orig if isinstance(exc, DBAPIError) else exc.strerror).splitlines()[0]
        if "malformed" in why:
            raise _damaged(name or location, why) from None
        raise LedgerUnavailable(f"cannot open the ledger {shown(name or location)}: {why}"
                                f"{_owner_hint(engine)}") from None
    return Ledger(engine)


def _keep_private(path: str) -> None:
    """The ledger holds the results' download links: its owner's alone. Made so where it is
    not (a new file); one on a disk the system made read-only is read as it is."""
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)


def _refuse_if_damaged(engine: Engine, location: str | Path) -> None:
    """A SQLite ledger whose file is damaged (a disk that lost power mid-write, a bad sector)
    is refused before anything is paid for: what it says was paid may not be all there is.
    Read-only: a run holding the ledger is not waited for."""
    if engine.dialect.name != "sqlite":
        return
    with engine.execution_options(readonly=True).connect() as conn:
        found = conn.exec_driver_sql("PRAGMA quick_check(1)").scalar()
    if found != "ok":  # the first problem found, after a line naming the database
        raise _damaged(location, str(found).splitlines()[-1])


def _damaged(location: str | Path, why: str) -> LedgerUnavailable:
    return LedgerUnavailable(
        f"the ledger {location} is damaged ({why}); nothing was sent. It is the record of "
        "what was paid for: keep it, and save what can still be read of it (sqlite3 LEDGER "
        ".recover | sqlite3 RECOVERED), then run with --ledger RECOVERED or put it in the "
        "damaged one's place.")


def shown(location: str | Path) -> str:
    text = str(location)
    return make_url(text).render_as_string(hide_password=True) if "://" in text else text


def _owner_hint(engine: Engine) -> str:
    """Why a SQLite ledger another user owns does not open: it is kept private to its owner."""
    if engine.dialect.name != "sqlite" or not engine.url.database:
        return ""
    try:
        owner = os.stat(engine.url.database).st_uid
        if owner == os.geteuid() or os.access(engine.url.database, os.R_OK | os.W_OK):
            return ""
        name = pwd.getpwuid(owner).pw_name
    except (OSError, KeyError):
        return ""
    return f" (only its owner ({name}) may open it: run skinbatch as that user)"
