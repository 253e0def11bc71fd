"""The ``skinbatch`` command: thin click commands over the library in :mod:`batch`."""

from __future__ import annotations

import functools
import io
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from batch import config as config_mod
from batch.apispec import EMULATOR_KEY, OPTION_NAMES
from batch.config import ConfigError, RunConfig, prepare_out, there
from batch.exitcodes import ExitCode
from batch.ledger import LedgerGone, LedgerUnavailable, LedgerUnwritable, open_ledger
from batch.locking import LedgerBusy
from batch.logsetup import configure
from batch.names import SHOWN, STATE_DIR
from batch.outputs import unmounted_mount_point
from batch.pipeline import RunReport, run_batch
from batch.report import write_report
from batch.requeue import dismiss as dismiss_jobs
from batch.requeue import requeue
from batch.roots import RootMap
from batch.secret import Secret
from batch.states import JobState
from batch.status import StatusReport, collect_status, problem_words

if TYPE_CHECKING:  # imported only by the commands that need them
    from batch.emulator import Emulator
    from batch.watch import WatchSettings

F = TypeVar("F", bound=Callable[..., Any])
#: Files needing a person named after a run (``status`` lists them all).
PROBLEMS_SHOWN = 20


def handle_errors(func: F) -> F:
    """The one place domain errors become a message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"skinbatch: {exc}", err=True)
            sys.exit(ExitCode.USAGE)
        except (LedgerBusy, LedgerUnwritable, LedgerUnavailable) as exc:
            click.echo(f"skinbatch: {exc}", err=True)
            sys.exit(ExitCode.USAGE)
        except LedgerGone as exc:
            click.echo(f"skinbatch: {exc}: run the same command once it is back.", err=True)
            sys.exit(ExitCode.SOME_FAILED)
        except KeyboardInterrupt:
            click.echo("skinbatch: interrupted.", err=True)
            sys.exit(ExitCode.INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def option_flags(func: F) -> F:
    for name in reversed(OPTION_NAMES):
        flag = name.replace("_", "-")
        func = click.option(f"--{flag}/--no-{flag}", name, default=None,
                            help=f"Turn the {name} retouching option on (or off).")(func)
    return func


def run_options(func: F) -> F:
    decorators = [
        click.argument("sources", nargs=-1, required=True,
                       type=click.Path(path_type=Path)),
        click.option("--out", "out", required=True, type=click.Path(path_type=Path),
                     help="Output folder; mirrors the sources' relative paths."),
        click.option("--config", "config_file", type=click.Path(path_type=Path),
                     help="TOML config file (see sample_config.toml)."),
        click.option("--ledger", help="Ledger file or database URL "
                                      "(default: OUT/.skinbatch/ledger.sqlite)."),
        click.option("--api-base", help="API base URL (env AILAB_API_BASE)."),
        click.option("--concurrency", type=int, help="Uploads under way at once (default 4)."),
        click.option("--poll-interval", type=float,
                     help="Seconds between status queries per task (default 5, as documented)."),
        click.option("--max-qps", type=float,
                     help="A ceiling on requests per second to the API (default: none; the "
                          "pace the API takes is found by asking)."),
        click.option("--on-ambiguous", type=click.Choice(["resubmit", "hold"]),
                     help="What to do with uploads whose answer was lost (default resubmit)."),
        click.option("--on-expired", type=click.Choice(["resubmit", "report"]),
                     help="What to do with results whose links expired (default resubmit)."),
        click.option("--max-credits", "budget", type=click.IntRange(min=0),
                     help="At most this many uploads that may be charged in this run."),
        click.option("--stop-submitting-at", help="No new uploads after this time "
                                                  "(07:30, 6h, 90m or ISO 8601)."),
        click.option("--deadline", help="End the run at this time, saving state."),
        click.option("--report", "report", type=click.Path(path_type=Path),
                     help="Write the report here at the end (.html, .csv or .json)."),
        click.option("--dry-run", is_flag=True,
                     help="Show what would be sent, rejected and skipped, and the cost."),
        click.option("--max-upload-rate",
                     help="At most this many bytes a second of uploads, e.g. 800k or 5M "
                          "(MiB/s; 5M is about 42 Mbit/s). Default: no cap."),
        click.option("--root", "root_flags", multiple=True, metavar="NAME=PATH",
                     help="Name a source tree for a shared ledger, with its path on this "
                          "machine (repeatable; config [roots])."),
        click.option("--worker-name",
                     help="This run's name among the workers of a shared PostgreSQL ledger "
                          "(default: host:pid)."),
        click.option("--lease-seconds", type=float,
                     help="A worker silent this long loses its jobs to the others "
                          "(default 30)."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                     help="json: one JSON object per line, for log collectors."),
        click.option("--keep-upload-metadata", is_flag=True, default=None,
                     help="Upload files with their EXIF/XMP/IPTC metadata (default: removed "
                          "before upload, put back on the results)."),
        click.option("--pay-again", is_flag=True, default=None,
                     help="Send photos retouched before, paid again: into another output "
                          "folder (default: their results are copied from there), or here "
                          "under other options (default: held, their results kept)."),
        click.option("--emulator", is_flag=True,
                     help="Run against the bundled local emulator (no key, no credits); its "
                          "imitation results keep to their own --out."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bars (default: on a terminal only)."),
        click.option("-q", "--quiet", is_flag=True,
                     help="For cron: only warnings, errors and the files that need a person."),
        click.option("-v", "--verbose", is_flag=True, help="Debug logging."),
        option_flags,
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


@click.group()
@click.version_option(package_name="skinbatch")
def main() -> None:
    """Send a folder of portraits through the skin-retouching API, safely and at most once."""
    # A path that is not UTF-8 (a name from an old share) is printed escaped, as the ledger
    # shows it, where a UTF-8 terminal's strict encoding would end the command on it.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=SHOWN)


def _roots(pairs: tuple[str, ...]) -> dict[str, str]:
    """The trees ``--root NAME=PATH`` names (run's and retry's)."""
    roots = [pair.partition("=") for pair in pairs]
    if any(not name or not sep or not path for name, sep, path in roots):
        raise ConfigError("--root takes NAME=PATH, e.g. --root shoots=/mnt/nas/shoots")
    return {name: path for name, _, path in roots}


def _build_config(sources: tuple[Path, ...], out: Path, params: dict[str, Any]) -> RunConfig:
    file_values = config_mod.load_file(params["config_file"]) if params["config_file"] else {}
    flags = {k: params[k] for k in ("ledger", "api_base", "concurrency", "poll_interval",
                                    "max_qps", "on_ambiguous", "on_expired", "budget",
                                    "stop_submitting_at", "deadline", "report", "worker_name",
                                    "lease_seconds", "max_upload_rate")}
    flags["progress"] = params["progress"]
    if params["root_flags"]:
        flags["roots"] = {**file_values.get("roots", {}), **_roots(params["root_flags"])}
    if params["keep_upload_metadata"]:
        flags["upload_metadata"] = "keep"
    if params["pay_again"]:
        flags["pay_again"] = True
    env = dict(os.environ)
    if params["emulator"]:
        env.pop(config_mod.KEY_ENV, None)
        env.pop(config_mod.BASE_ENV, None)
        file_values.pop("api_key_file", None)
    return config_mod.build(sources, out, file_values=file_values, env=env, flags=flags,
                            option_flags={n: params[n] for n in OPTION_NAMES})


@main.command()
@run_options
@handle_errors
def run(sources: tuple[Path, ...], out: Path, quiet: bool, verbose: bool,
        **params: Any) -> None:
    """Scan SOURCES, send every photo, poll, and save results into --out until all are final.

    Running the same command again resumes; on a finished folder it sends nothing.
    """
    config, emulator = _prepare(sources, out, quiet, verbose, params)
    if params["dry_run"]:
        from batch import dryrun

        try:
            click.echo(dryrun.plan(config).to_text())
        finally:
            if emulator is not None:
                emulator.stop()
        return
    _run_and_exit(config, emulator, quiet)


@main.command()
@run_options
@click.option("--settle", type=float, default=5.0, show_default=True,
              help="Seconds a new file must stay unchanged (and decode) before it is taken.")
@click.option("--rescan", type=float, default=60.0, show_default=True,
              help="Seconds between full (stat-only) re-scans that catch missed events.")
@click.option("--polling", is_flag=True, help="Poll instead of inotify (network shares).")
@handle_errors
def watch(sources: tuple[Path, ...], out: Path, quiet: bool, verbose: bool, settle: float,
          rescan: float, polling: bool, **params: Any) -> None:
    """Like run, but keep going: new and moved-in files are taken as they arrive.

    Stop with Ctrl-C or SIGTERM: uploads under way get their answer, state is saved, exit 130.
    """
    from batch.watch import WatchSettings

    config, emulator = _prepare(sources, out, quiet, verbose, params)
    _run_and_exit(config, emulator, quiet, WatchSettings(settle, rescan, polling))


def _prepare(sources: tuple[Path, ...], out: Path, quiet: bool, verbose: bool,
             params: dict[str, Any]) -> tuple[RunConfig, Emulator | None]:
    """Settings, logging, and the bundled emulator when --emulator is given."""
    config = _build_config(sources, out, params)
    configure(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
              config.api_key, json_lines=params["log_format"] == "json")
    emulator = _maybe_emulator(params, None if params["dry_run"] else config)
    if emulator is not None:
        config = replace(config, api_key=Secret(EMULATOR_KEY), api_base=emulator.api_base,
                         poll_interval=params["poll_interval"] or 1.0)
    return config, emulator


def _run_and_exit(config: RunConfig, emulator: Emulator | None, quiet: bool,
                  watch: WatchSettings | None = None) -> None:
    try:
        if config.api_key is None:
            raise ConfigError("no API key: set AILAB_API_KEY, or api_key_file in --config; "
                              "or add --emulator to try the bundled emulator")
        report = run_batch(config, watch)
    finally:
        if emulator is not None:
            emulator.stop()
    _print_summary(report, config, quiet)
    sys.exit(int(report.exit_code))


def _maybe_emulator(params: dict[str, Any], config: RunConfig | None) -> Emulator | None:
    """The bundled emulator for --emulator. A run's keeps its tasks (and ports, where they are
    free) beside the ledger, so that the same command run again finishes what it started; a
    dry run's keeps nothing."""
    if not params["emulator"]:
        return None
    from batch.emulator import Emulator, EmulatorConfig

    state_dir = None if config is None else prepare_out(config) / STATE_DIR / "emulator"
    emulator = Emulator(EmulatorConfig(queue_seconds=0.5, process_seconds=1.0,
                                       state_dir=state_dir)).start()
    logging.getLogger("batch").info(
        "Using the bundled emulator at %s: no credits are spent and the retouch is a local "
        "imitation.", emulator.api_base)
    return emulator


def _print_summary(report: RunReport, config: RunConfig, quiet: bool) -> None:
    """The run's summary, its problems and where the results are; with -q (cron) only what
    went wrong: the files that need a person, as warnings (cron mails what is said, not an
    exit code, and a JSON log keeps them one object each), and nothing on a clean night."""
    if report.message and not report.said:
        click.echo(f"skinbatch: {report.message}", err=True)
    status = report.status
    problems = _problem_lines(status, config.out)
    if quiet:
        for state, line in problems:
            logging.getLogger("batch").warning("%s %s", state, line)
        return
    counts, scan = status.counts, report.scan
    scanned = (f"{scan.found} file{'' if scan.found == 1 else 's'} scanned, {scan.hashed} read"
               if not scan.stopped else
               f"{scan.found} file{'' if scan.found == 1 else 's'} found, {scan.hashed} read; "
               "the scan was cut short: the next run looks at the rest")
    click.echo(
        f"skinbatch: {counts['done']} done, {counts['failed']} failed, "
        f"{status.rejected} rejected{_dismissed(status)}, {status.unfinished} unfinished "
        f"({scanned}) "
        f"in {report.seconds:.1f}s; credits charged this run: {report.charged} "
        f"(all runs: {status.charges})")
    for state, line in problems:
        click.echo(f"  {state:9} {line}")
    click.echo(f"Results are in {config.out.resolve()}.")
    if config.report is not None:
        click.echo(f"Report: open {config.report.resolve()} in a browser.")
    else:
        click.echo(f"Report: skinbatch report --out {config.out}")


def _dismissed(status: StatusReport) -> str:
    return f" ({len(status.dismissed)} of them dismissed)" if status.dismissed else ""


def _problem_lines(status: StatusReport, out: Path) -> list[tuple[str, str]]:
    """The files that need a person, by state, at most :data:`PROBLEMS_SHOWN` named. Photos
    a stop left unsent share its reason (a deadline, the account out of credits): a line
    for each reason with how many, not a line for each of a night's photos."""
    waiting = Counter(problem_words(p) for p in status.problems if p.state == JobState.PENDING)
    lines = [(JobState.PENDING.value, f"{n} photo(s) {reason}") for reason, n in waiting.items()
             if n > 1]
    named = [p for p in status.problems
             if p.state != JobState.PENDING or waiting[problem_words(p)] == 1]
    lines += [(p.state, f"{p.path}: {problem_words(p)}") for p in named[:PROBLEMS_SHOWN]]
    if len(named) > PROBLEMS_SHOWN:
        lines.append(("...", f"and {len(named) - PROBLEMS_SHOWN} more: "
                             f"skinbatch status --out {out}"))
    return lines


def _ledger_location(out: Path, ledger: str | None) -> str:
    location = ledger or str(out / STATE_DIR / "ledger.sqlite")
    if "://" not in location and not there(Path(location), "the ledger"):
        gone = unmounted_mount_point(Path(location).expanduser().resolve())
        raise ConfigError(f"no ledger at {location}: " + (
            f"{gone.point} is not mounted" if gone is not None
            else f"has skinbatch run with --out {out}?"))
    return location


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--ledger", help="Ledger file or database URL.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def status(out: Path, ledger: str | None, as_json: bool) -> None:
    """Counts by state, and every failed or rejected file with its reason."""
    location = _ledger_location(out, ledger)
    store = open_ledger(location)
    try:
        report = collect_status(store)
    finally:
        store.close()
    click.echo(report.to_json() if as_json else report.to_text())


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--ledger", help="Ledger file or database URL.")
@click.option("--format", "fmt", type=click.Choice(["html", "csv", "json"]),
              help="html, csv or json (default: the suffix of -o, else html).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Where to write it (default: OUT/skinbatch-report.FORMAT).")
@handle_errors
def report(out: Path, ledger: str | None, fmt: str | None, output: Path | None) -> None:
    """The morning report: counts, credits, failures with reasons, before/after thumbnails."""
    store = open_ledger(_ledger_location(out, ledger))
    path = output or out / f"skinbatch-report.{fmt or 'html'}"
    try:
        target = write_report(store, path, out.resolve(), fmt)
    except OSError as exc:  # a full disk, or one the system made read-only
        raise ConfigError(f"cannot write the report to {path}: {exc.strerror or exc}; give "
                          "it another place with -o FILE") from None
    finally:
        store.close()
    click.echo(f"report written to {target}", err=True)  # stdout may be the report itself


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--ledger", help="Ledger file or database URL.")
@click.option("--failed", is_flag=True, help="Put failed jobs back in line.")
@click.option("--rejected", is_flag=True, help="Put rejected jobs back in line.")
@click.option("--ambiguous", is_flag=True, help="Resubmit uploads whose answer was lost "
                                                 "(may pay again).")
@click.option("--expired", is_flag=True, help="Resubmit jobs whose results expired (pays again).")
@click.option("--root", "root_flags", multiple=True, metavar="NAME=PATH",
              help="A source tree's name on a shared ledger, with its path on this machine "
                   "(as given to run), to find PATHS under it.")
@click.argument("paths", nargs=-1)
@handle_errors
def retry(out: Path, ledger: str | None, failed: bool, rejected: bool, ambiguous: bool,
          expired: bool, root_flags: tuple[str, ...], paths: tuple[str, ...]) -> None:
    """Put chosen jobs back in line for the next run (optionally only for PATHS: files, or
    folders whose photos all go back)."""
    states = [s for s, on in ((JobState.FAILED, failed), (JobState.REJECTED, rejected),
                              (JobState.AMBIGUOUS, ambiguous), (JobState.EXPIRED, expired)) if on]
    if not states:
        raise ConfigError("say what to retry: --failed, --rejected, --ambiguous or --expired")
    roots = _roots(root_flags)
    try:
        root_map = RootMap.of(roots)
    except ValueError as exc:
        raise ConfigError(f"--root: {exc}") from None
    moved, fetched = requeue(_ledger_location(out, ledger), states,
                             [Path(p) for p in paths], root_map)
    if moved == 0:
        what = f" for {', '.join(paths)}" if paths else ""
        click.echo(f"skinbatch: no {'/'.join(s.value for s in states)} job matched{what}; "
                   "nothing was put back in line.", err=True)
        sys.exit(ExitCode.SOME_FAILED)
    paid = (f" ({fetched} of them paid for: downloaded again, not paid again)"
            if fetched else "")
    click.echo(f"{moved} job(s) put back in line{paid}; run the same skinbatch run command "
               "again (a watch working on this ledger takes them by itself).")


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--ledger", help="Ledger file or database URL.")
@click.option("--root", "root_flags", multiple=True, metavar="NAME=PATH",
              help="A source tree's name on a shared ledger, with its path on this machine "
                   "(as given to run), to find PATHS under it.")
@click.argument("paths", nargs=-1, required=True)
@handle_errors
def dismiss(out: Path, ledger: str | None, root_flags: tuple[str, ...],
            paths: tuple[str, ...]) -> None:
    """Accept the failed and rejected photos at PATHS (files, or folders: every one under
    one) unretouched: they are no longer listed as needing a person, nor make a run exit 1.
    retry --failed/--rejected sends one again."""
    try:
        root_map = RootMap.of(_roots(root_flags))
    except ValueError as exc:
        raise ConfigError(f"--root: {exc}") from None
    done = dismiss_jobs(_ledger_location(out, ledger), [Path(p) for p in paths],
                        root_map)
    if done == 0:
        click.echo(f"skinbatch: no failed or rejected photo matched {', '.join(paths)}; "
                   "nothing was dismissed.", err=True)
        sys.exit(ExitCode.SOME_FAILED)
    click.echo(f"{done} photo(s) dismissed: no longer listed as needing a person.")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8700, show_default=True, type=int)
@click.option("--result-port", default=8701, show_default=True, type=int)
@click.option("--key", default=EMULATOR_KEY, show_default=True, help="The API key it accepts.")
@click.option("--credits", default=1000.0, show_default=True, type=float)
@click.option("--queue-seconds", default=2.0, show_default=True, type=float)
@click.option("--process-seconds", default=3.0, show_default=True, type=float)
@click.option("--result-ttl", default=24 * 3600.0, show_default=True, type=float)
@click.option("--qps-limit", default=None, type=float, help="Answer 429 above this rate.")
@click.option("--upload-bandwidth", default=None, type=float,
              help="Bytes a second it reads of uploads, across all connections (an uplink).")
@click.option("--fault-rate", default=0.0, show_default=True, type=float,
              help="Probability of each fault (5xx, drops, truncation) per request.")
def emulate(host: str, port: int, result_port: int, key: str, credits: float,
            queue_seconds: float, process_seconds: float, result_ttl: float,
            qps_limit: float | None, upload_bandwidth: float | None, fault_rate: float) -> None:
    """Serve a local emulator of the API (for trying things out, tests and benchmarks)."""
    from batch.emulator import Emulator, EmulatorConfig, Faults

    faults = Faults(submit_5xx=fault_rate, query_5xx=fault_rate, download_truncate=fault_rate,
                    submit_drop_after=fault_rate / 2, query_drop=fault_rate)
    try:
        emulator = Emulator(EmulatorConfig(api_keys=frozenset({key}), credits=credits,
                                           queue_seconds=queue_seconds,
                                           process_seconds=process_seconds,
                                           result_ttl=result_ttl, qps_limit=qps_limit,
                                           upload_bandwidth=upload_bandwidth, faults=faults),
                            host=host, api_port=port, result_port=result_port)
    except OSError as exc:  # a client pointed at the port would reach whatever holds it
        raise click.UsageError(f"cannot serve on {host} port {port} or {result_port}: "
                               f"{exc.strerror or exc} (another emulator running?)") from None
    emulator.start()
    click.echo(f"API at {emulator.api_base}, results at {emulator.result_base}. "
               f"Use: AILAB_API_BASE={emulator.api_base} "
               f"AILAB_API_KEY={key if key == EMULATOR_KEY else '<key>'} skinbatch run ...")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.stop()
