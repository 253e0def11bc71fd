"""The ledger's hot path: statements compiled once by SQLAlchemy, run on the driver's cursor.

A job moves through five states per image, each a short transaction, and the stages read the
job's files and claim work between them. Through SQLAlchemy's execution layer (pool events,
the begin hook, execution context, result rows) a point read cost 170 us of CPU that the
driver itself answers in 14 us, and a transition 275 us against 117 us: together about a third
of the client's CPU per image. The statements are still written in SQLAlchemy Core against
the models and compiled for the engine's dialect, so they follow the schema on SQLite and
PostgreSQL alike; only their execution skips the layer.

Every write that may skip the disk flush (scan records in bulk, moves the next run redoes for
free) goes through :meth:`Connections.transaction`: this module is the one place that decides
how durable a write is. Writes through SQLAlchemy are always durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from batch.ledger.checkpoint import BackgroundCheckpoint

#: Pages the WAL may hold before a commit checkpoints it: SQLite's default, and during bulk
#: writes, when a thread of their own checkpoints every ``BULK_CHECKPOINT`` pages (see
#: ``batch.ledger.checkpoint``; the bound is what the WAL grows to should it fall behind).
WAL, BULK_WAL, BULK_CHECKPOINT = 1000, 65536, 8192
PAGE = 4096  # SQLite's default page size (bytes)
#: The page cache of a connection (bytes), and while it makes bulk writes: a first scan's
#: transaction changes pages all over the jobs' content index, and a cache too small for them
#: writes them out and reads them back before the commit writes them again.
CACHE, BULK_CACHE = 8 * 1024 * 1024, 32 * 1024 * 1024
#: What the WAL is cut back to when reused after a checkpoint (bytes).
WAL_SIZE_LIMIT = 16 * 1024 * 1024


def begin_sqlite(execute: Callable[[str], Any], info: dict[str, Any], *, readonly: bool,
                 bulk: bool = False, durable: bool = True) -> None:
    """Begin a SQLite transaction on a connection whose ``info`` remembers its settings.

    Readers take no lock in WAL mode, so a read-only transaction begins deferred; writers take
    the lock up front (BEGIN IMMEDIATE) instead of failing mid-transaction on lock upgrade.
    A write that is not ``durable`` (synchronous=NORMAL) commits without an fsync; the next
    durable commit's fsync of the WAL makes it durable too. A ``bulk`` write (scan records,
    redone by the next scan if lost) is not durable either, and its pages wait in the WAL
    longer before being checkpointed, and it skips the foreign-key check (a scan record's job
    id comes from a sub-select of the jobs table in the same statement).

    The wait: a checkpoint run by a commit copies the WAL into the database and flushes both
    to disk before the commit returns, stalling the scan's one writer (90-150 ms each here;
    far longer on a spinning disk). During bulk writes a thread of their own checkpoints
    instead (see :class:`Connections`); the WAL shrinks back to ``WAL_SIZE_LIMIT`` when it is
    next reused."""
    if readonly:
        execute("BEGIN")
        return
    if info.get("bulk", False) != bulk:
        checkpoint, keys, cache = (BULK_WAL, "OFF", BULK_CACHE) if bulk else (WAL, "ON", CACHE)
        execute(f"PRAGMA wal_autocheckpoint={checkpoint}")
        execute(f"PRAGMA cache_size=-{cache // 1024}")
        execute(f"PRAGMA foreign_keys={keys}")
        info["bulk"] = bulk
    synchronous = "FULL" if durable and not bulk else "NORMAL"
    if info.get("synchronous", "FULL") != synchronous:
        execute(f"PRAGMA synchronous={synchronous}")
        info["synchronous"] = synchronous
    execute("BEGIN IMMEDIATE")


def dialect_insert(engine: Engine) -> Callable[[Any], Any]:
    """``insert`` with the engine's dialect's ``ON CONFLICT`` clauses (SQLite, PostgreSQL)."""
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


def _picker(keys: Sequence[str | int]) -> Callable[[Any], tuple[Any, ...]]:
    """The values at ``keys`` (names of a mapping or positions in a tuple), as a tuple,
    picked in C (a first scan binds every file)."""
    if len(keys) > 1:
        return itemgetter(*keys)
    return lambda values: tuple(values[key] for key in keys)


class Statement:
    """A Core statement compiled once for ``engine``'s dialect, its parameters bound by name.
    Values given when the statement was built are kept; an ``IN`` list must be given as
    ``literal()`` elements (a plain list compiles to a form only SQLAlchemy can expand)."""

    __slots__ = ("_defaults", "_layouts", "_order", "_pick", "sql")

    def __init__(self, engine: Engine, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        self._defaults: dict[str, Any] = {}
        self._order: tuple[str, ...] | None = None
        if isinstance(compiled, SQLCompiler):  # not DDL
            required = {name for name, bind in compiled.binds.items() if bind.required}
            self._defaults = {name: value for name, value in compiled.params.items()
                              if name not in required}
            self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._pick = None if self._order is None else _picker(self._order)
        self._layouts: dict[tuple[str, ...], Callable[[Sequence[Any]], Any]] = {}

    def bind(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        merged = {**self._defaults, **values} if self._defaults else values
        return merged if self._pick is None else self._pick(merged)

    def bind_rows(self, layout: tuple[str, ...], rows: Iterable[Sequence[Any]]
                  ) -> Iterable[Any]:
        """Rows given as tuples of the values named in ``layout``, in the form the driver
        takes: as they are when the statement's parameters come in that order, else
        reordered in C. No dict per row (a first scan binds two rows per file)."""
        if layout == self._order:
            return rows
        pick = self._layouts.get(layout)
        if pick is None:
            if self._order is None:
                defaults = self._defaults

                def pick(row: Sequence[Any]) -> Mapping[str, Any]:
                    return {**defaults, **dict(zip(layout, row, strict=True))}
            else:
                missing = set(self._order) - set(layout)
                if missing:
                    raise ValueError(f"layout lacks {sorted(missing)}")
                pick = _picker([layout.index(name) for name in self._order])
            self._layouts[layout] = pick
        return map(pick, rows)


class Cursor:
    """A driver cursor inside one transaction, taking :class:`Statement` objects."""

    __slots__ = ("_cursor", "attached")

    def __init__(self, cursor: Any, attached: tuple[str, ...] = ()) -> None:
        self._cursor = cursor
        #: The schemas of the databases attached for this transaction.
        self.attached = attached

    def execute(self, statement: Statement, values: Mapping[str, Any] | None = None) -> int:
        """Run it; returns the number of rows it changed."""
        self._cursor.execute(statement.sql, statement.bind(values or {}))
        return int(self._cursor.rowcount)

    def executemany(self, statement: Statement, layout: tuple[str, ...],
                    rows: Sequence[Sequence[Any]]) -> None:
        """Run it once per row, rows given as tuples laid out as ``layout``."""
        if rows:
            self._cursor.executemany(statement.sql, statement.bind_rows(layout, rows))

    def savepoint(self) -> None:
        self._cursor.execute("SAVEPOINT one_write")

    def release(self) -> None:
        self._cursor.execute("RELEASE SAVEPOINT one_write")

    def rollback_to_savepoint(self) -> None:
        self._cursor.execute("ROLLBACK TO SAVEPOINT one_write")
        self.release()

    def rows(self, statement: Statement, values: Mapping[str, Any] | None = None
             ) -> list[tuple[Any, ...]]:
        self._cursor.execute(statement.sql, statement.bind(values or {}))
        return list(self._cursor.fetchall())

    def scalar(self, statement: Statement, values: Mapping[str, Any] | None = None) -> Any:
        self._cursor.execute(statement.sql, statement.bind(values or {}))
        row = self._cursor.fetchone()
        return None if row is None else row[0]


#: The schemas databases are attached as for one transaction: ``attached0``, ``attached1``...
ATTACHED = "attached"

#: Connections a ledger keeps for the threads that use its hot path: well under the SQLite
#: pool's 5 + 10, so the rest of the ledger always finds one free.
HELD = 4


class Connections:
    """Driver connections for the hot path. SQLite: the first few threads that use it (the
    event loop's first) keep one until :meth:`close`, as checking a connection out of
    SQLAlchemy's pool and back in for each transaction cost as much CPU as the statements
    themselves; any other thread (a dry run's checker pool, say) takes one from the pool per
    transaction. Other databases: always from the pool, so its pre-ping replaces a connection
    the server has dropped. SQLite's WAL is checkpointed in the background after bulk commits
    (:mod:`batch.ledger.checkpoint`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Any] = []
        self._sqlite = engine.dialect.name == "sqlite"
        self._checkpoint = (BackgroundCheckpoint(engine, BULK_CHECKPOINT * PAGE)
                            if self._sqlite else None)

    def _get(self) -> tuple[Any, bool]:
        """This thread's connection, and whether it is held (not returned after use)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        connection = self.engine.raw_connection()
        if self._sqlite:
            with self._lock:
                if len(self._all) < HELD:
                    self._all.append(connection)
                    self._local.connection = connection
                    return connection, True
        return connection, False

    def close(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.close()
        with self._lock:
            held, self._all = self._all, []
        for connection in held:
            connection.close()
        self._local = threading.local()

    @contextmanager
    def transaction(self, *, write: bool, durable: bool = True, bulk: bool = False,
                    images: Sequence[bytes] = ()) -> Iterator[Cursor]:
        """One transaction: committed on success, rolled back on error. A write is flushed to
        disk before the commit returns unless it is not ``durable`` or is ``bulk`` (see
        :func:`begin_sqlite`; PostgreSQL: ``synchronous_commit`` off for the transaction).
        SQLite only: each of ``images`` (a serialized database) is attached for the
        transaction, as the schema named in :attr:`Cursor.attached`."""
        if images and not self._sqlite:
            raise ValueError("only a SQLite ledger attaches databases")
        connection, held = self._get()
        cursor = connection.cursor()
        attached: list[str] = []
        try:
            for image in images:
                name = f"{ATTACHED}{len(attached)}"
                cursor.execute(f"ATTACH DATABASE ':memory:' AS {name}")
                attached.append(name)
                connection.driver_connection.deserialize(image, name=name)
            if self._sqlite:
                begin_sqlite(cursor.execute, connection.info, readonly=not write,
                             durable=durable, bulk=bulk)
            elif write and (bulk or not durable):
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
            yield Cursor(cursor, tuple(attached))
            connection.commit()
            if bulk and self._checkpoint is not None:
                self._checkpoint.after_bulk_commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            try:
                for name in attached:
                    cursor.execute(f"DETACH DATABASE {name}")
            finally:
                cursor.close()
                if not held:
                    connection.close()
