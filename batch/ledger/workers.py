"""Workers sharing one ledger, as the ledger records them: leases renewed by a heartbeat on
the database's clock, a lapsed worker's jobs taken over, the batch's --max-credits as one
count, and the API's requests booked among the workers under one --max-qps. What a run does
with these is :mod:`batch.worker`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)

from batch.ledger.models import api_slots, events, jobs, meta, workers
from batch.ledger.store import Ledger, TransitionInfo
from batch.states import IN_FLIGHT, JobState

#: The batch's --max-credits shared by its workers (meta key): {"limit": n, "used": k}.
BUDGET_KEY = "batch_budget"
#: The retouching options of the batch's workers (meta key): their fingerprint.
OPTIONS_KEY = "batch_options"
_BATCH_OPTIONS = select(meta.c.value).where(meta.c.key == OPTIONS_KEY)
#: The advisory lock that makes workers register one at a time on a shared ledger.
REGISTER_LOCK = 0x736B696E72656731  # "skinreg1"
#: Workers that ended longer ago than this (seconds) leave the list (history keeps their work).
WORKERS_KEPT = 7 * 86400

def _db_now(dialect: str) -> ColumnElement[float]:
    """The database's clock in seconds since the epoch: leases are judged by one clock, not by
    each machine's own."""
    if dialect == "postgresql":
        return literal_column("extract(epoch from clock_timestamp())::float8")
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)")


@dataclass(frozen=True, slots=True)
class WorkerRow:
    name: str
    host: str
    pid: int
    started_at: float
    #: Seconds since its last heartbeat, by the database's clock.
    silent_for: float
    lease_seconds: float
    stopped_at: float | None
    taken_over_by: str | None
    taken_over_jobs: int | None
    #: Jobs it holds now, by state.
    holding: dict[str, int]

    @property
    def live(self) -> bool:
        return (self.stopped_at is None and self.taken_over_by is None
                and self.silent_for < self.lease_seconds)


class WorkerNameTaken(RuntimeError):
    """A live worker of that name already works on the ledger."""


class OptionsDiffer(RuntimeError):
    """The batch's live workers retouch under other options (their fingerprint): two option
    sets on one batch would each pay for every photo, its output flipping between them."""

    def __init__(self, fingerprint: str) -> None:
        super().__init__(fingerprint)
        self.fingerprint = fingerprint


class WorkerRecords:
    """The workers' rows of one ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def register(self, name: str, host: str, pid: int, lease_seconds: float,
                 budget: int | None = None, options: str | None = None) -> int | None:
        """Start a worker's lease; refused while a live worker of that name holds one. With a
        ``budget`` (--max-credits), join the batch's: a worker that finds no other live one
        opens a new batch with its own; one that joins keeps the batch's. Returns the batch's
        budget in force (None: no budget). With ``options`` (their fingerprint), likewise:
        the first worker of a batch sets them, and one that joins with others is refused
        (:class:`OptionsDiffer`)."""
        now = _db_now(self.ledger.engine.dialect.name)
        with self.ledger._write() as conn:
            if self.ledger.shared:  # one registration at a time: the first of a batch knows it is
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTER_LOCK})
            row = conn.execute(select(
                workers.c.stopped_at, workers.c.taken_over_by, workers.c.host, workers.c.pid,
                (now - workers.c.heartbeat_at).label("silent"), workers.c.lease_seconds)
                .where(workers.c.name == name)).first()
            # This very process may hold it still: a watch carrying on after its ledger went
            # away and came back, without the chance to sign off.
            if row is not None and row.stopped_at is None and row.taken_over_by is None \
                    and row.silent < row.lease_seconds and (row.host, row.pid) != (host, pid):
                raise WorkerNameTaken(name)
            alone = not conn.scalar(self._live().where(workers.c.name != name))
            if options is not None:
                batch = None if alone else conn.scalar(_BATCH_OPTIONS)
                if batch not in (None, options):
                    raise OptionsDiffer(batch)
                self.ledger._set_meta(conn, OPTIONS_KEY, options)
            conn.execute(workers.delete().where(workers.c.name == name))
            ended = func.coalesce(workers.c.stopped_at, workers.c.taken_over_at)
            conn.execute(workers.delete().where(ended < time.time() - WORKERS_KEPT))
            conn.execute(workers.insert().values(
                name=name, host=host, pid=pid, started_at=time.time(), heartbeat_at=now,
                lease_seconds=lease_seconds))
            in_force = self._batch_budget(conn)
            if budget is not None and (alone or in_force is None):
                self.ledger._set_meta(conn, BUDGET_KEY, json.dumps({"limit": budget, "used": 0}))
                in_force = (budget, 0)
        self.ledger.worker = name
        return None if budget is None or in_force is None else in_force[0]

    def _batch_budget(self, conn: Connection, lock: bool = False) -> tuple[int, int] | None:
        query = select(meta.c.value).where(meta.c.key == BUDGET_KEY)
        value = conn.scalar(query.with_for_update() if lock else query)
        if value is None:
            return None
        found = json.loads(value)
        return int(found["limit"]), int(found["used"])

    def take_budget(self, units: int) -> bool:
        """Take ``units`` (1, or -1 to give one back) of the batch's --max-credits, atomically
        among its workers; False when none is left."""
        with self.ledger._write() as conn:
            budget = self._batch_budget(conn, lock=True)
            if budget is None:
                return True
            limit, used = budget
            if units > 0 and used + units > limit:
                return False
            self.ledger._set_meta(conn, BUDGET_KEY, json.dumps(
                {"limit": limit, "used": max(0, used + units)}))
        return True

    def budget_left(self) -> int | None:
        with self.ledger._read() as conn:
            budget = self._batch_budget(conn)
        return None if budget is None else budget[0] - budget[1]

    def beat(self, name: str) -> bool:
        """Renew the worker's lease. False: it lapsed and another worker took its jobs."""
        with self.ledger._write(durable=False) as conn:
            return bool(conn.execute(update(workers).where(
                workers.c.name == name, workers.c.taken_over_by.is_(None),
                workers.c.stopped_at.is_(None)).values(
                heartbeat_at=_db_now(self.ledger.engine.dialect.name))).rowcount)

    def _unended(self) -> ColumnElement[bool]:
        return and_(workers.c.stopped_at.is_(None), workers.c.taken_over_by.is_(None))

    def _leased(self) -> ColumnElement[bool]:
        return workers.c.heartbeat_at >= (_db_now(self.ledger.engine.dialect.name)
                                          - workers.c.lease_seconds)

    def lapsed(self, me: str, *, all_others: bool = False) -> list[str]:
        """Workers whose lease ran out without a clean stop and whose jobs nobody took yet
        (``all_others``: every other one that did not stop cleanly, lease or not)."""
        query = select(workers.c.name).where(workers.c.name != me, self._unended())
        if not all_others:
            query = query.where(~self._leased())
        with self.ledger._read() as conn:
            return list(conn.scalars(query))

    def _live(self) -> Select[int]:
        return select(func.count()).select_from(workers).where(self._unended(), self._leased())

    def live(self) -> int:
        with self.ledger._read() as conn:
            return conn.scalar(self._live()) or 0

    def options_in_force(self) -> str | None:
        """The retouching options (their fingerprint) of the batch live workers are at work
        on; None when none is alive (a worker starting now opens a batch with its own)."""
        with self.ledger._read() as conn:
            return conn.scalar(_BATCH_OPTIONS) if conn.scalar(self._live()) else None

    def take_over(self, dead: str, taker: str) -> int | None:
        """Take a lapsed worker's jobs: an upload it had under way becomes ambiguous, a half
        download ready again, and its tasks are the taker's to poll and save (a history row on
        each says so); the rest go back to anyone. None: another worker took them first."""
        why = f"worker {dead}'s lease lapsed"
        with self.ledger._write() as conn:
            lock = select(workers.c.name).where(workers.c.name == dead,
                                                workers.c.taken_over_by.is_(None))
            if conn.scalar(lock.with_for_update()) is None:
                return None
            self.ledger._recover(conn, dead, why)
            held = conn.execute(select(jobs.c.id, jobs.c.state).where(
                jobs.c.owner == dead)).all()
            now = time.time()
            for job_id, state in held:
                if JobState(state) in IN_FLIGHT:
                    self.ledger._event(conn, job_id, state, state, 0, TransitionInfo(
                        message=f"{why}; taken over by {taker}"), now)
            conn.execute(update(jobs).where(
                jobs.c.owner == dead, jobs.c.state.in_([s.value for s in IN_FLIGHT]))
                .values(owner=taker))
            conn.execute(update(jobs).where(jobs.c.owner == dead).values(owner=None))
            conn.execute(update(workers).where(workers.c.name == dead).values(
                taken_over_by=taker, taken_over_at=now, taken_over_jobs=len(held)))
        return len(held)

    def stop(self, name: str) -> None:
        """A clean end: the worker's jobs go back to anyone (a half download to ``ready``)."""
        with self.ledger._write() as conn:
            self.ledger._recover(conn, name, f"worker {name} stopped")
            conn.execute(update(jobs).where(jobs.c.owner == name).values(owner=None))
            conn.execute(update(workers).where(workers.c.name == name).values(
                stopped_at=time.time()))

    def listing(self) -> list[WorkerRow]:
        silent = (_db_now(self.ledger.engine.dialect.name) - workers.c.heartbeat_at).label("silent")
        with self.ledger._read() as conn:
            rows = conn.execute(select(workers, silent).order_by(workers.c.started_at)).all()
            holding: dict[str, dict[str, int]] = {}
            for owner, state, n in conn.execute(
                    select(jobs.c.owner, jobs.c.state, func.count())
                    .where(jobs.c.owner.is_not(None)).group_by(jobs.c.owner, jobs.c.state)):
                holding.setdefault(owner, {})[state] = n
        return [WorkerRow(r.name, r.host, r.pid, r.started_at, r.silent, r.lease_seconds,
                          r.stopped_at, r.taken_over_by, r.taken_over_jobs,
                          holding.get(r.name, {})) for r in rows]

    def work(self) -> dict[str, dict[str, int]]:
        """Per worker: uploads it had accepted and results it saved, from the history."""
        moves = {("submitting", "queued"): "uploaded", ("downloading", "done"): "saved"}
        query = (select(events.c.worker, events.c.from_state, events.c.to_state, func.count())
                 .where(events.c.worker.is_not(None),
                        or_(*[and_(events.c.from_state == a, events.c.to_state == b)
                              for a, b in moves]))
                 .group_by(events.c.worker, events.c.from_state, events.c.to_state))
        found: dict[str, dict[str, int]] = {}
        with self.ledger._read() as conn:
            for worker, a, b, n in conn.execute(query):
                found.setdefault(worker, {})[moves[(a, b)]] = n
        return found

    def next_api_slot(self, api_base: str, interval: float) -> float:
        """Book the next request to the API host among all workers sharing one rate: returns
        how long to wait for the booked moment (virtual scheduling on the database's clock)."""
        now = _db_now(self.ledger.engine.dialect.name)
        statement = self.ledger._insert(api_slots).values(api_base=api_base, next_at=now + interval)
        statement = statement.on_conflict_do_update(
            index_elements=["api_base"],
            set_={"next_at": func.greatest(api_slots.c.next_at, now) + interval
                  if self.ledger.shared else func.max(api_slots.c.next_at, now) + interval})
        with self.ledger._write(durable=False) as conn:
            booked = conn.execute(statement.returning(
                api_slots.c.next_at - interval - now)).scalar()
        return max(0.0, float(booked or 0.0))
