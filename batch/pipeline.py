"""One run: scan, then submit, poll and download concurrently until every job is final."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from batch import answers, apispec, crashpoints, elsewhere, pace, requeue
from batch.api import ApiClient, ApiError, ErrorKind
from batch.api.bandwidth import UploadPace
from batch.api.breaker import CircuitBreaker
from batch.api.client import Timeouts
from batch.api.errors import ACCOUNT_CODES
from batch.budget import BatchBudget, Budget, Estimate
from batch.config import ConfigError, RunConfig, check_paths, prepare_out, unreached
from batch.copies import materialize_copies
from batch.exitcodes import ExitCode
from batch.ledger import Ledger, LedgerGone, LedgerUnwritable, open_ledger
from batch.ledger.store import LAST_RUN, RUN_STARTED, RUNS
from batch.ledger.workers import WorkerRecords
from batch.ledger.writer import LedgerWriter
from batch.locking import RunLock, tell_if_on_a_share
from batch.options import NOTHING_ON, redone_words
from batch.outputs import clean_temp_files, tag_temp_files
from batch.preflight import release_pixel_memory
from batch.progress import Progress
from batch.report import write_report
from batch.roots import RootMap
from batch.scan import (
    ScanStats,
    SourceRoot,
    no_photos,
    scan,
    tell_left_out,
    unreadable_words,
)
from batch.stages.downloader import Downloader
from batch.stages.poller import Poller
from batch.stages.runtime import GONE_RECHECK, WAITING_STOPS, Answered, Runtime, StopReason
from batch.stages.submitter import Submitter
from batch.states import IN_FLIGHT, UNFINISHED, JobState, submittable
from batch.status import StatusReport, collect_status, rejected
from batch.worker import SharedPace, Worker

if TYPE_CHECKING:  # watch mode's module (and watchdog) is imported by watch runs only
    from batch.watch import WatchSettings

log = logging.getLogger("batch")


@dataclass
class RunReport:
    exit_code: ExitCode
    status: StatusReport
    scan: ScanStats
    recovered: dict[str, int] = field(default_factory=dict)
    message: str | None = None
    seconds: float = 0.0
    charged: int = 0
    #: The message was logged as an error when the run stopped on it (not said twice).
    said: bool = False


def source_roots(sources: tuple[Path, ...], root_map: RootMap | None = None
                 ) -> list[SourceRoot]:
    """One source maps straight onto --out; of several, a folder gets a subfolder named after
    it, and a photo given by itself lands at the top of --out (a second of that name, in a
    numbered subfolder). A source under a tree the root map names is recorded under that
    name."""
    root_map = root_map or RootMap()
    used: dict[str, int] = {}
    roots = []
    for source in sources:
        prefix = ""
        if len(sources) > 1:
            name = source.resolve().name or "source"
            used[name] = used.get(name, 0) + 1
            if used[name] > 1:
                prefix = f"{name}-{used[name]}"
            elif not os.path.isfile(source):
                prefix = name
        root = SourceRoot(source, prefix)
        roots.append(replace(root, key=root_map.key_for(root.base)))
    return roots


def forget_missing_outputs(ledger: Ledger, out_dir: Path) -> int:
    """Outputs the ledger wrote but that are gone from disk are written again (for free)."""
    gone = [file_id for file_id, rel in ledger.written_outputs()
            if not (out_dir / rel).is_file()]
    for file_id in gone:
        ledger.set_file_output(file_id, written_rel=None, written_sha256=None)
    return len(gone)


def run_batch(config: RunConfig, watch: WatchSettings | None = None) -> RunReport:
    """Run the whole batch to completion (or to a stop), from a library or the CLI. With
    ``watch``, keep running and take new files as they arrive, until interrupted.

    A SQLite ledger that goes away with its drive or share stops a run (:class:`LedgerGone`).
    A watch, which runs for days, waits for it instead and then carries on as the same
    command started again would: a service manager restarting it sooner would find an empty
    mount point, start a new ledger there and pay again for every photo. Uploads answered
    meanwhile are recorded once it is back, by the watch or by the next run."""
    if config.api_key is None:
        raise ValueError("no API key")
    unrecorded = answers.kept(config.ledger_file)
    loaded = list(unrecorded)
    try:
        while True:
            try:
                return _run_batch(config, watch, unrecorded)
            except LedgerGone as gone:
                if watch is None:
                    raise
                log.error("%s: the watch waits for it to come back.", gone)
                if not _back(gone.path):
                    raise KeyboardInterrupt from None
                log.warning("The ledger %s is back: watching again.", gone.path)
    finally:
        if unrecorded != loaded:
            later = ("kept on this machine for the next run on it to record"
                     if answers.keep(config.ledger_file, unrecorded)
                     else "the next run counts them ambiguous")
            if unrecorded:
                log.error("%d upload(s) were answered once the ledger had gone: %s (tasks %s).",
                          len(unrecorded), later,
                          ", ".join(one.task.task_id for one in unrecorded))


def _back(path: str) -> bool:
    """Wait until the file at ``path`` is there again (True) or a stop signal (False)."""

    async def wait() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in _stop_signals():  # removed again when the loop closes
            loop.add_signal_handler(sig, stop.set)
        while not os.path.exists(path):  # os.path: a dead share's errors mean "not there"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), GONE_RECHECK)
            if stop.is_set():
                return False
        return True

    return asyncio.run(wait())


def _run_batch(config: RunConfig, watch: WatchSettings | None,
               unrecorded: list[Answered]) -> RunReport:
    check_paths(config)
    out_dir = prepare_out(config)
    started, started_at = time.monotonic(), datetime.now().astimezone()
    with RunLock(out_dir, config.ledger_location):
        ledger = open_ledger(config.ledger_location)
        try:
            check_results_source(ledger, config)
            tell_if_on_a_share(ledger)
            elsewhere.remember(config)
            worker = Worker(ledger, config.worker_name, config.lease_seconds)
            in_force = worker.register(config.budget, config.options)
            if in_force is not None and in_force != config.budget:
                log.warning("This worker joins a batch whose --max-credits is %d (not %s): "
                            "the workers share that one.", in_force, config.budget)
            _record_start(ledger, started_at, worker.name)
            since = time.time()
            try:
                with ledger.pinned():  # the event loop's own reads and claims
                    report = asyncio.run(_run(config, ledger, out_dir, watch, worker,
                                              unrecorded))
            except Exception as error:
                if (gone := ledger.gone()) is not None:
                    raise gone from error
                raise
            finally:
                worker.stop()
            if (gone := ledger.gone()) is not None:
                raise gone
            report.seconds = time.monotonic() - started
            # The database may be coming back from a restart: the run's end waits for it too.
            report.charged = ledger.patiently(lambda: ledger.charged_by(worker.name, since))
            with contextlib.suppress(LedgerUnwritable):  # bookkeeping: the stop said why
                ledger.patiently(lambda: _record_run(ledger, report, started_at))
            if config.report is not None:
                try:
                    write_report(ledger, config.report, out_dir)
                except OSError as exc:  # a full disk: the run's work is done all the same
                    log.error("The report could not be written to %s: %s", config.report,
                              exc.strerror or exc)
        finally:
            ledger.close()
    return report


def check_results_source(ledger: Ledger, config: RunConfig) -> None:
    """A ledger's results come from the API or from the bundled emulator, never from both:
    after a try with ``--emulator``, the same command with a key would find the photos done
    (the API never asked) and leave the imitations as the results; the other way round, the
    imitations would land among the API's results. Refused before anything is sent."""
    emulated = ledger.emulated()
    if config.ledger is None:
        where, flag, or_else = str(config.out), "--out", f" (or delete {config.out} to start again)"
    else:  # named by the flag, not its location: a database URL may carry a password
        where, flag, or_else = "the ledger given by --ledger", "--ledger", ""
    if emulated and not config.bundled_emulator:
        raise ConfigError(
            f"{where} holds the bundled emulator's imitation retouches (runs with "
            f"--emulator, or with its key), and the photos done there would not be sent to "
            f"the API: use another {flag} for the API{or_else}")
    if config.bundled_emulator and not emulated:
        if ledger.charges():
            raise ConfigError(
                f"{where} holds the API's results: the bundled emulator's imitations would "
                f"be mixed in; try the emulator with another {flag}")
        ledger.mark_emulated()


def _record_start(ledger: Ledger, started_at: datetime, worker: str) -> None:
    """A run is counted and noted as it starts: one that is killed (a power cut, the kernel
    out of memory) never reaches its end's record, and the morning report must not show the
    run before it as the last one. The reasons the run before wrote on the photos it left
    waiting were its own: this run writes its own at its end, if it reaches it."""
    ledger.set_meta(RUNS, str(int(ledger.get_meta(RUNS) or 0) + 1))
    ledger.set_meta(RUN_STARTED, json.dumps({
        "started": started_at.isoformat(timespec="seconds"), "worker": worker}))
    ledger.forget_why_waiting()


def _record_run(ledger: Ledger, report: RunReport, started_at: datetime) -> None:
    ledger.set_meta(LAST_RUN, json.dumps({
        "started": started_at.isoformat(timespec="seconds"),
        "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 1), "exit_code": int(report.exit_code),
        "charged": report.charged, "scanned": report.scan.found, "message": report.message,
    }))


def _client(config: RunConfig, ledger: Ledger, worker: Worker) -> ApiClient:
    """The API client: the pace the ledger remembers, connections for the uploads, polls and
    downloads under way at once, and the upload cap."""
    assert config.api_key is not None
    client = ApiClient(config.api_base, config.api_key,
                       limiter=pace.limiter_for(ledger, config.api_base, config.max_qps,
                                                worker.live),
                       timeouts=Timeouts(submit=config.submit_timeout),
                       max_connections=config.concurrency + 4,
                       max_downloads=max(2, config.concurrency),
                       max_result_bytes=config.max_result_bytes)
    if config.upload_rate is not None:
        client.upload_pace = UploadPace(config.upload_rate)
    return client


def _pick_up_leftovers(worker: Worker, out_dir: Path, root_map: RootMap) -> dict[str, int]:
    """What a run that died left: its half-done jobs made explicit again, its partial outputs
    removed; files an earlier run could not read are read again if they read now, and photos
    whose uploads the API failed are tried once more. Returns the jobs moved, by the state
    they are in now."""
    recovered = worker.recover()
    requeue.at_start(worker.ledger, root_map)
    if worker.alone():  # another worker's downloads under way are not leftovers
        clean_temp_files(out_dir)
    tag_temp_files(worker.name)
    _clean_after_dead(worker, out_dir)
    for state, n in recovered.items():
        if n:
            log.warning("Found %d job(s) a previous run left unfinished; now %s.", n, state)
    return recovered


async def _run(config: RunConfig, ledger: Ledger, out_dir: Path,
               watch: WatchSettings | None, worker: Worker,
               unrecorded: list[Answered]) -> RunReport:
    progress = Progress(config.progress)
    client = _client(config, ledger, worker)
    breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown)
    rt = Runtime(ledger, client, config, out_dir, progress, breaker, LedgerWriter(ledger),
                 worker=worker.name, watching=watch is not None,
                 sources=tuple(source_roots(config.sources, config.root_map)),
                 unrecorded=unrecorded)
    to_send = submittable(config.on_ambiguous, config.on_expired)
    loop = asyncio.get_running_loop()
    shared_pace = None
    if ledger.shared and config.max_qps is not None:
        client.limiter.shared = shared_pace = SharedPace(ledger, config.api_base, config.max_qps)
    stops = _stop_signals()
    for sig in stops:
        loop.add_signal_handler(sig, rt.interrupt)
    try:
        if recorded := answers.record(ledger, unrecorded):
            log.warning("Recorded %d upload(s) answered while the ledger was away.", recorded)
        recovered = _pick_up_leftovers(worker, out_dir, config.root_map)
        rt.elsewhere, copied = elsewhere.at_start(ledger, config)
        elsewhere.tell_copied(copied)
        _start_heartbeat(rt, worker, loop, rescale=shared_pace is None)
        forget_missing_outputs(ledger, out_dir)
        if not config.options.enabled:
            log.warning("%s", NOTHING_ON)
        for source in rt.sources:
            if unreached(source.path) is not None:
                await rt.goes_on_without(source.base)
        already = rt.count(to_send)
        progress.add_work(already, already + rt.count(IN_FLIGHT))
        scanning = asyncio.create_task(_scan(rt, loop, watching=watch is not None))
        if config.on_short_balance == "stop":  # the whole estimate decides: scan first
            stats = await scanning
            await _check_money(rt, rt.count(to_send))
        else:  # upload while the scan goes on: the balance bounds the uploads from the first
            rt.check_money = functools.partial(_check_money, rt, None)
            scanning.add_done_callback(lambda task: _scanned(rt, task, already))
        if watch is None:
            await _drive(rt, scanning=scanning)
        else:
            watcher = asyncio.create_task(_watch_after(rt, watch, scanning))
            watcher.add_done_callback(lambda task: _watcher_ended(rt, task))
            topping = asyncio.create_task(_credits_again(rt, watch.rescan))
            try:
                await _drive(rt, keep_running=True, scanning=scanning)
            finally:
                watcher.cancel()
                topping.cancel()
                await asyncio.gather(watcher, topping, return_exceptions=True)
        stats = await scanning
        if not rt.flags.abort:
            materialize_copies(ledger, out_dir, config.expiry_margin, rt.reaches, rt.elsewhere)
    finally:
        for sig in stops:
            loop.remove_signal_handler(sig)
        await client.aclose()
        if shared_pace is not None:
            shared_pace.close()
        progress.close()
        rt.writes.close()
        # Bookkeeping, left out when the ledger's disk is full (the stop said why); a ledger
        # gone raises here, and _run_batch says so.
        with contextlib.suppress(LedgerUnwritable):
            pace.remember(ledger, config.api_base, client.limiter, worker.live)
    waiting = rt.flags.submits_stopped
    if waiting in WAITING_STOPS:
        # Only jobs never sent: a lost answer or a lost result keeps its own reason. Left
        # out, as the bookkeeping above, when the ledger's disk is full.
        error, outage = rt.flags.account_error, rt.breaker.outage()
        reason = (f"not sent: {error.describe(ids=False) if error is not None else waiting}"
                  + (f"; {outage}" if outage else ""))
        with contextlib.suppress(LedgerUnwritable):
            ledger.patiently(lambda: ledger.annotate_waiting([JobState.PENDING], reason))
    status = ledger.patiently(lambda: collect_status(ledger))
    message = _stop_message(rt)
    return RunReport(_exit_code(rt, status), status, stats, recovered, message,
                     said=message is not None and message == rt.flags.fatal)


def _stop_signals() -> list[signal.Signals]:
    """What stops a run the gentle way (uploads under way get their answer, so none is left
    ambiguous): Ctrl-C, a service stopped, and a terminal or SSH session closed, unless the
    run was started under nohup, which asks to carry on then (SIGHUP ignored)."""
    stops = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        stops.append(signal.SIGHUP)
    return stops


def _start_heartbeat(rt: Runtime, worker: Worker, loop: asyncio.AbstractEventLoop,
                     rescale: bool) -> None:
    """The worker's heartbeat thread tells the event loop what it saw. Without a shared
    ceiling, each worker's pace becomes its share of what they found together."""

    def taken() -> None:
        loop.call_soon_threadsafe(rt.took_over)
        _clean_after_dead(worker, rt.out_dir)

    def lost(why: str) -> None:
        loop.call_soon_threadsafe(rt.fail_run, why[0].upper() + why[1:])

    def live(before: int, now: int) -> None:
        if rescale:
            loop.call_soon_threadsafe(rt.client.limiter.rescale, before, now)

    worker.start(on_taken=taken, on_lost=lost, on_live=live)


def _clean_after_dead(worker: Worker, out_dir: Path) -> None:
    """Partial outputs of the workers this one took over (their downloads are redone)."""
    while worker.taken:
        clean_temp_files(out_dir, worker.taken.pop())


async def _watch_after(rt: Runtime, watch: WatchSettings,
                       scanning: asyncio.Task[ScanStats]) -> None:
    """A watch's first scan uploads as it goes, as a run's does (a watch restarted over a
    backlog of a day's photos starts at once); the watcher takes over once it has ended, as
    its passes would read the same photos again. Shielded: the watcher's end must not cancel
    the scan, whose counts the run's summary gives."""
    from batch.watch import watch_sources

    try:
        stats = await asyncio.shield(scanning)
    except Exception:  # the scan's own error ends the run where the stages are driven
        return
    if not (rt.flags.interrupted or rt.flags.abort):
        await watch_sources(rt, watch, list(rt.sources), stats)


def _watcher_ended(rt: Runtime, task: asyncio.Task[None]) -> None:
    """A watch run that can no longer see new files must not sit there looking healthy."""
    if not task.cancelled() and (error := task.exception()) is not None:
        gone = rt.ledger.gone()
        rt.fail_run(f"{gone}." if gone else f"Watching the sources stopped: {error}")


async def _scan(rt: Runtime, loop: asyncio.AbstractEventLoop, watching: bool) -> ScanStats:
    """The sources into the ledger (in a thread), rows recorded a batch at a time, each batch
    waking the submitter: the ledger is the queue, so uploads start with the first batch. A
    source with no photos is said at once (a watched one may rightly start empty)."""
    config = rt.config

    def recorded(n: int) -> None:
        rt.progress.scanned(n)
        loop.call_soon_threadsafe(rt.wake_submitter.set)

    try:
        stats = await asyncio.to_thread(
            scan, rt.ledger, [s for s in rt.sources if s.ledger_root not in rt.away],
            config.options,
            exclude=(rt.out_dir,), on_progress=recorded, prepare=config.prepare,
            should_stop=lambda: rt.flags.interrupted or rt.flags.abort, out_dir=rt.out_dir,
            on_collision=config.on_collision, earlier=rt.elsewhere, pay_again=config.pay_again)
    except LedgerUnwritable as full:
        rt.fail_run(str(full))
        return ScanStats()
    crashpoints.reached("scanned")
    if not stats.stopped:
        await asyncio.to_thread(_forget_renamed, rt)
    tell_left_out(rt.ledger, stats.left_out)
    if not watching:
        for root in stats.empty_roots:
            log.warning("%s", no_photos(rt.ledger, root, config.options))
    else:  # a run lists them with its summary
        for folder, why in stats.unreadable_folders:
            log.warning("%s.", unreadable_words(folder, why))
    rt.progress.add_work(stats.new_jobs, stats.new_jobs)
    rt.progress.rejected(rejected(rt.ledger.counts()))
    elsewhere.tell_copied(stats.copied)
    await asyncio.to_thread(materialize_copies, rt.ledger, rt.out_dir, config.expiry_margin,
                            rt.reaches, rt.elsewhere)
    rt.changed.set()
    return stats


def _forget_renamed(rt: Runtime) -> None:
    """A source folder an earlier run recorded that is not there, and whose photos this run's
    sources hold: renamed or moved (``Smith`` become ``Smith wedding``). Its files are
    forgotten, so that its photos are neither counted twice nor waited for every night after.
    Not on a shared ledger, where another site's folder is not there on this machine."""
    if rt.ledger.shared:
        return
    for root in rt.ledger.roots_moved_to([s.ledger_root for s in rt.sources]):
        if not os.path.isdir(root):
            log.info("%s is not there and its photos are under this run's sources now "
                     "(renamed or moved?): forgotten.", root)
            rt.ledger.forget_root(root)


def _scanned(rt: Runtime, task: asyncio.Task[ScanStats], already: int) -> None:
    """The scan that ran beside the uploads is over: now the estimate can be told, with the
    balance; if the first upload has yet to read it, that read tells the estimate."""
    if task.cancelled() or task.exception() is not None or rt.flags.interrupted:
        return
    rt.to_pay = already + task.result().new_jobs
    if not (rt.to_pay and rt.balance_to_come):
        _tell_estimate(rt, rt.to_pay)


def _tell_estimate(rt: Runtime, to_pay: int) -> Estimate:
    per_image = rt.config.credits_per_image
    estimate = Estimate(to_pay, to_pay * per_image, rt.balance)
    log.info("Credits: %s.", estimate.describe())
    config = rt.config
    # Those whose uploads started before the scan ended count too.
    if redone := rt.count(submittable(config.on_ambiguous, config.on_expired)
                          | {JobState.SUBMITTING}, redone=True, sent_since=rt.started):
        log.warning("%s", redone_words(redone))
    if estimate.short and (affordable := estimate.affordable(per_image)):
        log.warning("The balance pays for %d of %d image(s); sending those.", affordable, to_pay)
    elif estimate.short:
        log.warning("The balance pays for none of the %d image(s).", to_pay)
    return estimate


async def _check_money(rt: Runtime, to_pay: int | None) -> None:
    """Before any upload: read the balance and set what the run may spend. ``to_pay``: the
    uploads the batch needs, or None while the scan that finds them may still be going (the
    balance alone bounds the uploads then, and the estimate is told when the scan ends, or
    here if it ended first)."""
    config = rt.config
    limit = config.budget
    if to_pay is None or to_pay:
        if not await _read_balance(rt):
            return
        if to_pay is None:  # the scan may have counted the batch while the balance was read
            to_pay = rt.to_pay
    if to_pay:
        estimate = _tell_estimate(rt, to_pay)
        if estimate.short and config.on_short_balance == "stop":
            rt.account_stop(ApiError(
                ErrorKind.ACCOUNT, f"the balance is too low for this batch "
                f"({estimate.describe()})", code=apispec.NOT_ENOUGH_CREDITS))
            return
    if rt.balance is not None:
        affordable = Estimate(0, 0, rt.balance).affordable(config.credits_per_image)
        if (to_pay is None or affordable < to_pay) and (limit is None or affordable < limit):
            rt.budget = Budget(affordable, by_balance=True)
    if rt.budget is None and limit is not None:
        rt.budget = (BatchBudget(WorkerRecords(rt.ledger)) if rt.ledger.shared
                     else Budget(limit))
    # With the scan still going, nothing may be left to pay for: the first upload that
    # finds the allowance spent says so.
    if to_pay is not None and rt.budget is not None and rt.budget.exhausted:
        rt.budget_spent()


async def _read_balance(rt: Runtime) -> bool:
    """Read the balance into ``rt.balance`` (asked again after a 429 or a transient failure).
    False: the run stops (its account refused, or a balance the stop policy needs cannot be
    read)."""
    try:
        rt.balance = await rt.client.balance()
        return True
    except ApiError as error:
        if error.kind is ErrorKind.ACCOUNT:
            rt.account_stop(error)
            return False
        if rt.config.on_short_balance == "stop":  # a batch it is not known to pay for
            rt.account_stop(ApiError(
                ErrorKind.ACCOUNT, f"the balance could not be read ({error.describe()}), and "
                "on_short_balance = \"stop\" sends a batch only once the balance is known to "
                "pay for it"))
            return False
        log.warning("Could not read the credit balance (%s); going on.", error.describe())
        return True


async def _credits_again(rt: Runtime, every: float) -> None:
    """A watch whose account ran out of credits goes on taking photos in, and reads the
    balance every ``every`` seconds: once someone tops the account up, uploads resume
    without anyone restarting it. Past --stop-submitting-at there is nothing to resume."""
    while True:
        await asyncio.sleep(every)
        error = rt.flags.account_error
        if error is None or not error.out_of_credits:
            continue
        stop_at = rt.config.stop_submitting_at
        if stop_at is not None and datetime.now().astimezone() >= stop_at:
            return
        try:
            balance = await rt.client.balance()
        except ApiError as failed:
            if failed.kind is ErrorKind.ACCOUNT:
                rt.account_stop(failed)
            continue
        needed = rt.config.credits_per_image
        if rt.config.on_short_balance == "stop":  # the whole waiting batch, or nothing
            needed *= rt.count(submittable(rt.config.on_ambiguous, rt.config.on_expired))
        # A balance the answer does not state: the next upload's answer tells, at no cost.
        if balance is None or balance >= needed:
            rt.credits_again(balance)


async def _clock(rt: Runtime) -> None:
    """Stop uploads at --stop-submitting-at; end the run at --deadline. Both are said at the
    start with their time zone: a server kept on UTC reads "06:30" as UTC, not as the
    studio's morning."""
    config = rt.config
    for what, when in (("No upload starts after", config.stop_submitting_at),
                       ("The run ends by", config.deadline)):
        if when is not None:
            log.info("%s %s.", what, f"{when:%Y-%m-%d %H:%M} ({when:%Z}, UTC{when:%z})")
    stop_at, deadline = config.stop_submitting_at, config.deadline
    if stop_at is not None and deadline is not None and stop_at > deadline:
        # Most likely the two times swapped: said, as the night's uploads end earlier than meant.
        log.warning("--stop-submitting-at (%s) comes after --deadline (%s): the deadline ends "
                    "the run first, uploads included.", f"{stop_at:%H:%M}", f"{deadline:%H:%M}")
    while True:
        now = datetime.now().astimezone()
        if config.stop_submitting_at is not None and now >= config.stop_submitting_at:
            rt.stop_submitting(StopReason.CLOCK)
        if config.deadline is not None and now >= config.deadline:
            rt.flags.deadline_reached = True
            rt.flags.abort = True
            rt.stop_submitting(StopReason.DEADLINE)
            return
        await asyncio.sleep(0.1)


COUNT_EVERY = 0.05


async def _drive(rt: Runtime, keep_running: bool = False,
                 scanning: asyncio.Task[ScanStats] | None = None) -> None:
    """Run the stages until every job is final (or a stop); while ``scanning``, more jobs
    may still come."""
    submitter, poller, downloader = Submitter(rt), Poller(rt), Downloader(rt)
    stages = [asyncio.create_task(s.run(), name=type(s).__name__)
              for s in (submitter, poller, downloader)]
    watched = [*stages, *([scanning] if scanning else [])]
    stages.append(asyncio.create_task(_clock(rt), name="clock"))
    last_count = 0.0
    worked = False  # since the pixel memory kept for the next copy was last given back
    try:
        while not (rt.flags.abort or rt.flags.interrupted):
            _raise_failure(rt, watched)
            busy = submitter.in_flight or downloader.in_flight or poller.in_flight
            if busy:
                worked = True
            elif worked:  # every photo's work is done: a watch waits for the next card
                worked = False
                release_pixel_memory()
            timeout = 0.25
            # Counting is a query: at most every COUNT_EVERY seconds, and only when idle; a
            # count put off is done as soon as it is due, so the run ends without a lag.
            more_coming = scanning is not None and not scanning.done()
            if not keep_running and not busy and not more_coming:
                due = last_count + COUNT_EVERY - time.monotonic()
                if due > 0:
                    timeout = due
                else:
                    last_count = time.monotonic()
                    try:
                        if _all_final(rt):
                            break
                    except DBAPIError as error:
                        await rt.wait_for_ledger(error)
            rt.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.changed.wait(), timeout=timeout)
    finally:
        await submitter.drain(0 if rt.flags.hard_stop else rt.config.interrupt_grace)
        requests = [*poller.in_flight, *downloader.in_flight.values()]
        for task in [*stages, *requests]:
            task.cancel()
        await asyncio.gather(*stages, *requests, return_exceptions=True)


def _raise_failure(rt: Runtime, tasks: list[asyncio.Task[Any]]) -> None:
    """A stage (or the scan) that died takes the run with it, with its own error; a full
    ledger is a stop with its message, not a crash."""
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            if isinstance(error, LedgerUnwritable):
                rt.fail_run(str(error))
                return
            raise error


def _all_final(rt: Runtime) -> bool:
    active = IN_FLIGHT if rt.flags.submits_stopped else IN_FLIGHT | submittable(
        rt.config.on_ambiguous, rt.config.on_expired)
    return rt.count(active) == 0


def _exit_code(rt: Runtime, status: StatusReport) -> ExitCode:
    if rt.flags.account_error is not None:
        return ExitCode.ACCOUNT
    if rt.flags.interrupted:
        return ExitCode.INTERRUPTED
    unfinished, problems = status.unfinished, status.problems
    if rt.ledger.shared:  # a worker answers for the files under its own roots
        unfinished = rt.count(UNFINISHED)
        mine = tuple(root.rstrip("/") + "/" for root in rt.roots)
        problems = [p for p in problems if (p.path + "/").startswith(mine)]
    if (rt.flags.deadline_reached or rt.flags.fatal is not None or unfinished or problems
            or rt.away):
        return ExitCode.SOME_FAILED
    return ExitCode.OK


def _stop_message(rt: Runtime) -> str | None:
    error: ApiError | None = rt.flags.account_error
    if error is not None:
        if error.out_of_credits:
            return ("Stopped: the account is out of credits. Results already paid for were "
                    "saved; top up and run the same command again to send the rest.")
        if error.http_status in (401, 403) or error.code in ACCOUNT_CODES:
            return (f"Stopped: {error.describe()}. Check AILAB_API_KEY (or the key file) and "
                    "the account, then run the same command again.")
        return f"Stopped: {error.describe()}. Once that is put right, run the same command again."
    if rt.flags.fatal:
        return rt.flags.fatal
    # A night the API could not be reached ends at its deadline or stop time like any
    # other: the words say what kept the photos from being sent.
    outage = f" Meanwhile {outage}." if (outage := rt.breaker.outage()) else ""
    if rt.flags.deadline_reached:
        open_jobs = rt.ledger.jobs_in(IN_FLIGHT)
        if not open_jobs:
            return ("Deadline reached: nothing paid is in flight; the photos not sent wait "
                    f"for the next run.{outage}")
        expiries = [j.expires_at for j in open_jobs if j.expires_at]
        until = (f"; their result links expire from "
                 f"{datetime.fromtimestamp(min(expiries)):%Y-%m-%d %H:%M}" if expiries else "")
        return (f"Deadline reached: {len(open_jobs)} paid job(s) still in flight{until}. Run "
                f"the same command again{' before then' if expiries else ''} to save them."
                f"{outage}")
    if rt.flags.submits_stopped in WAITING_STOPS:
        return (f"Uploads stopped: {rt.flags.submits_stopped.value}; the rest wait for the "
                f"next run.{outage}")
    if rt.flags.interrupted:
        return "Interrupted: progress is saved; run the same command again to carry on."
    return None
