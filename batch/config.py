"""Run settings: defaults, then the TOML config file, then the environment, then flags."""

from __future__ import annotations

import difflib
import errno
import functools
import os
import stat
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from batch import apispec
from batch.api.bandwidth import parse_rate
from batch.deadlines import parse_when
from batch.names import IMAGE_SUFFIXES, STATE_DIR, is_utf8, shown
from batch.options import Options, unknown_names
from batch.outputs import short_of_room, unmounted_mount_point
from batch.preflight import PrepareSettings
from batch.roots import RootMap
from batch.secret import Secret

KEY_ENV = "AILAB_API_KEY"
BASE_ENV = "AILAB_API_BASE"
AmbiguousPolicy = Literal["resubmit", "hold"]
ExpiredPolicy = Literal["resubmit", "report"]
ShortBalancePolicy = Literal["partial", "stop"]
FitPolicy = Literal["resize", "reject"]
CollisionPolicy = Literal["skip", "suffix", "overwrite"]
UploadMetadata = Literal["strip", "keep"]


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class RunConfig:
    sources: tuple[Path, ...]
    out: Path
    options: Options = field(default_factory=Options)
    api_base: str = apispec.DEFAULT_API_BASE
    api_key: Secret | None = field(default=None, repr=False)
    #: Ledger file path or database URL; None puts it under ``out/.skinbatch/``.
    ledger: str | None = None
    concurrency: int = 4
    poll_interval: float = apispec.DOCUMENTED_POLL_INTERVAL
    #: A ceiling on requests per second to the API host (submits, queries and credit checks
    #: together); None: no ceiling, the pace the server takes is found by asking.
    max_qps: float | None = None
    on_ambiguous: AmbiguousPolicy = "resubmit"
    on_expired: ExpiredPolicy = "resubmit"
    #: Transient failures a job may have in one stage before it fails with the last reason.
    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    #: How long the provider keeps results (24 h); change it only to test against an emulator.
    result_ttl: float = apispec.RESULT_TTL_SECONDS
    #: A result link is treated as expired this many seconds before its life is up.
    expiry_margin: float = 600.0
    #: Consecutive 5xx/timeouts on uploads that pause all uploads, and the first pause (s).
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    #: Open tasks the poller keeps in memory; the rest wait in the ledger, oldest polled first.
    poll_window: int = 10_000
    #: Submit answers may take this long (generous: a slow upload is not a lost answer).
    submit_timeout: float = 180.0
    #: Results larger than this many bytes are refused.
    max_result_bytes: int = 64 * 1024 * 1024
    #: On Ctrl-C, how long uploads already under way may take to get their answer.
    interrupt_grace: float = 15.0
    progress: bool | None = None
    #: At most this many uploads that may be charged in one run (None: no limit).
    budget: int | None = None
    #: What one image costs, for the estimate against the balance.
    credits_per_image: float = 1.0
    #: When the balance cannot pay for the batch: send what it can ("partial") or nothing.
    on_short_balance: ShortBalancePolicy = "partial"
    #: No new uploads after this moment; paid work is still polled and saved.
    stop_submitting_at: datetime | None = None
    #: The run ends at this moment, saving state.
    deadline: datetime | None = None
    #: Write the report here at the end of every run (.html, .csv or .json).
    report: Path | None = None
    #: Files over the API's limits: "resize" a copy within them, or "reject" them.
    fit: FitPolicy = "resize"
    #: Longest side of a resized upload (under 4096), and its JPEG quality.
    max_side: int = 4095
    jpeg_quality: int = 92
    #: Scale results of resized uploads back to the original dimensions.
    upscale_to_original: bool = False
    #: A different file already at an output path: "skip" it, write a "suffix"-ed name, or
    #: "overwrite" it. Outputs never land inside a source folder, whatever the policy.
    on_collision: CollisionPolicy = "skip"
    #: Take a source that lies inside the output folder (its files may be earlier results).
    allow_source_inside_out: bool = False
    #: "strip": uploads carry no EXIF/XMP/IPTC/comments (results get them back); "keep".
    upload_metadata: UploadMetadata = "strip"
    #: At most this many bytes a second of uploads ("800k", "5M"; None: no cap).
    max_upload_rate: str | None = None
    #: Names of source trees that machines sharing a ledger mount at different paths, each
    #: with this machine's mount point (see ``batch.roots``).
    roots: dict[str, str] = field(default_factory=dict)
    #: This run's name among the workers of a shared ledger (default: host:pid).
    worker_name: str | None = None
    #: A worker silent this long (no heartbeat) has lost its jobs to the others.
    lease_seconds: float = 30.0
    #: Send photos retouched before, paid again: into another output folder (see
    #: ``batch.elsewhere``), or here under other options (see ``batch.scan``).
    pay_again: bool = False

    @property
    def bundled_emulator(self) -> bool:
        """The API is skinbatch's emulator (``--emulator``, or a run with its key, which the
        API never issues): its results are imitations, kept apart from the API's (see
        ``batch.pipeline.check_results_source``)."""
        return self.api_key == Secret(apispec.EMULATOR_KEY)

    @property
    def prepare(self) -> PrepareSettings:
        return PrepareSettings(self.fit, self.max_side, self.jpeg_quality, self.upload_metadata)

    @functools.cached_property
    def root_map(self) -> RootMap:
        return RootMap.of(self.roots)

    @property
    def upload_rate(self) -> float | None:
        return None if self.max_upload_rate is None else parse_rate(self.max_upload_rate)

    @property
    def ledger_location(self) -> str:
        return self.ledger or str(self.out / STATE_DIR / "ledger.sqlite")

    @property
    def ledger_file(self) -> Path | None:
        """The ledger's file on this machine, or None for a database (a URL)."""
        location = self.ledger_location
        return None if "://" in location else Path(location).expanduser().resolve()

    @property
    def written_folders(self) -> list[Path]:
        """The folders a run writes to on this machine: the output's, and a ledger file's."""
        folders = [self.out.expanduser().resolve()]
        if self.ledger_file is not None:
            folders.append(self.ledger_file.parent)
        return folders


def _file_settings() -> tuple[dict[str, type], dict[str, tuple[str, ...]]]:
    """What a config file may set and the words it may use, read off RunConfig's fields so
    that a new setting needs no second list."""
    kinds: dict[str, type] = {"api_key_file": str}
    choices: dict[str, tuple[str, ...]] = {}
    for name, hint in get_type_hints(RunConfig).items():
        if name in ("sources", "out", "api_key", "progress"):
            continue
        if get_origin(hint) is Literal:
            choices[name], kinds[name] = get_args(hint), str
            continue
        if get_origin(hint) is dict:
            kinds[name] = dict
            continue
        base = next((a for a in get_args(hint) if a is not type(None)), hint)
        kinds[name] = {Options: dict, datetime: str, Path: str}.get(base, base)
    return kinds, choices


FILE_KEYS, CHOICES = _file_settings()


#: The settings' types in words, for messages.
KINDS: dict[type, str] = {str: "text in quotes", int: "a whole number", float: "a number",
                          bool: "true or false", dict: "a table ([name])"}


#: Keys a user writes by the flag's name or by guess, and what the file says instead: a guess
#: by spelling would point at another setting (max_credits -> max_attempts).
MISTAKEN_KEYS = {
    "max_credits": "the key of --max-credits is budget = N",
    "keep_upload_metadata": 'the key of --keep-upload-metadata is upload_metadata = "keep"',
    "root": 'the key of --root is a [roots] table of NAME = "PATH"',
    "api_key": ("a key is never read from a config file (files get copied and shared): put it "
                'in a file of its own named by api_key_file = "FILE" (chmod 600), or in '
                "AILAB_API_KEY"),
}
#: Flags of ``run`` that have no key: they say how this run talks, not what the batch is.
FLAGS_ONLY = frozenset({"out", "quiet", "verbose", "dry_run", "emulator", "log_format",
                        "progress", "config"})


def _not_a_setting(key: str) -> str:
    """What a key the file may not hold is, in words that point at the right one."""
    flag = key.replace("-", "_")
    if flag in apispec.OPTION_NAMES:
        return f"{key} is a retouching option: put it under [options]"
    if flag in MISTAKEN_KEYS:
        return f"{key}: {MISTAKEN_KEYS[flag]}"
    if flag in FLAGS_ONLY:
        return f"{key} is a command-line flag only (--{flag.replace('_', '-')}), not a setting"
    meant = difflib.get_close_matches(flag, apispec.OPTION_NAMES, n=1)
    if meant and not difflib.get_close_matches(flag, FILE_KEYS, n=1):
        return (f"unknown setting: {key!r}; if it is the retouching option {meant[0]!r}, put "
                "it under [options]")
    return unknown_names("setting", [key], FILE_KEYS)


def load_file(path: Path) -> dict[str, Any]:
    """Read and check a TOML config file (see sample_config.toml for every key)."""
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # Notepad's BOM
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for key, value in values.items():
        expected = FILE_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"{path}: {_not_a_setting(key)}")
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{path}: {key} must be {KINDS[expected]}, not {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(CHOICES[key])}")
    if "api_key_file" in values:
        values["api_key_file"] = str(path.parent / Path(values["api_key_file"]).expanduser())
    return values


def read_key_file(path: Path) -> Secret:
    """The key from a file readable by its owner only (0600), so it never needs a flag."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"key file {path} is readable by others; run: chmod 600 {path}")
        key = path.read_text(encoding="utf-8-sig").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
    if not key:
        raise ConfigError(f"key file {path} is empty")
    return Secret(key)


def build(
    sources: tuple[Path, ...],
    out: Path,
    *,
    file_values: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
    option_flags: dict[str, bool | None] | None = None,
) -> RunConfig:
    """Merge the layers: file < environment < flags (None in ``flags`` means not given)."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = dict(file_values or {})
    file_options = values.pop("options", {})
    key_file = values.pop("api_key_file", None)
    try:
        options = Options.from_mapping(file_options)
    except ValueError as exc:
        raise ConfigError(f"[options]: {exc}") from exc
    enabled = set(options.enabled)
    for name, on in (option_flags or {}).items():
        if on is True:
            enabled.add(name)
        elif on is False:
            enabled.discard(name)
    if env.get(BASE_ENV):
        values["api_base"] = env[BASE_ENV]
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    key: Secret | None = None
    if env.get(KEY_ENV):
        key = Secret(env[KEY_ENV].strip())
    elif key_file:
        key = read_key_file(Path(key_file))
    _parse_times_and_paths(values)
    distinct: dict[Path, Path] = {}  # a folder given twice is one source, not two subfolders
    for source in sources:
        distinct.setdefault(source.resolve(), source)
    sources = tuple(distinct.values())
    known = {f.name for f in fields(RunConfig)}
    config = RunConfig(sources=sources, out=out, options=Options(frozenset(enabled)),
                       api_key=key, **{k: v for k, v in values.items() if k in known})
    validate(config)
    return config


def _parse_times_and_paths(values: dict[str, Any]) -> None:
    for name in ("stop_submitting_at", "deadline"):
        if isinstance(values.get(name), str):
            try:
                values[name] = parse_when(values[name])
            except ValueError as exc:
                raise ConfigError(f"{name.replace('_', '-')}: {exc}") from None
    if isinstance(values.get("report"), str):
        values["report"] = Path(values["report"]).expanduser()


def validate(config: RunConfig) -> None:
    if config.concurrency < 1 or config.concurrency > 64:
        raise ConfigError("concurrency must be between 1 and 64")
    if config.poll_interval <= 0:
        raise ConfigError("poll_interval must be positive")
    if config.max_qps is not None and config.max_qps <= 0:
        raise ConfigError("max_qps must be positive (leave it out for no ceiling)")
    try:
        _ = config.upload_rate
    except ValueError as exc:
        raise ConfigError(f"max_upload_rate: {exc}") from None
    try:
        _ = config.root_map
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"[roots]: {exc}") from None
    if config.lease_seconds < 2:
        raise ConfigError("lease_seconds must be at least 2 (a heartbeat goes every second)")
    if config.worker_name is not None and not 0 < len(config.worker_name) <= 128:
        raise ConfigError("the worker name must be 1 to 128 characters")
    if config.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    if config.poll_window < 1:
        raise ConfigError("poll_window must be at least 1")
    if not 256 <= config.max_side < 4096:
        raise ConfigError("max_side must be between 256 and 4095")
    if not 40 <= config.jpeg_quality <= 100:
        raise ConfigError("jpeg_quality must be between 40 and 100")
    if config.budget is not None and config.budget < 0:
        raise ConfigError("the budget (--max-credits) cannot be negative")
    if config.report is not None and config.report.suffix.lower() not in (".html", ".csv",
                                                                            ".json"):
        raise ConfigError("the report file must end in .html, .csv or .json")
    if not config.api_base.startswith(("http://", "https://")):
        raise ConfigError(f"api_base must be an http(s) URL, not {config.api_base!r}")
    check_paths(config)


def there(path: Path, what: str) -> bool:
    """Whether ``path`` exists. A drive or share that answers with an error instead (its
    server down: ENOTCONN, EIO, a stale handle) is said as such, before anything is sent."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be reached: {exc.strerror or exc} (is its "
                          "drive or share there, and its server up?)") from None
    return True


def unreached(source: Path) -> str | None:
    """Why a source is not there, in a sentence (None: it is): missing (a drive not plugged
    in, a share not mounted, a typing slip), or a share that answers with an error."""
    try:
        return None if there(source, "the source") else f"source {source} does not exist"
    except ConfigError as exc:
        return str(exc)


def check_paths(config: RunConfig, *, may_be_away: bool = True) -> None:
    """Refuse, before anything is created or sent, an output folder that would make paid
    results undeliverable or pay twice: inside a source (outputs there are refused, and would
    be scanned as new photos), or a source inside the output (earlier results retouched and
    paid for again, unless ``allow_source_inside_out``). A source folder that is not there is
    refused, but where ``may_be_away`` (a run, not a watch) and another source is there: the
    run goes on with those (see ``batch.pipeline``)."""
    out = config.out.expanduser().resolve()
    away = []
    for source in config.sources:
        if (why := unreached(source)) is not None:
            away.append(why)
            if not may_be_away or source.suffix.lower() in IMAGE_SUFFIXES:
                raise ConfigError(away[-1])
            continue
        src = source.resolve()
        if not is_utf8(str(src)):
            raise ConfigError(f"the path of the source {shown(str(source))} is not valid UTF-8 "
                              "text (a name written in another system's encoding): rename it")
        if src == out:
            raise ConfigError("--out must not be the source folder itself")
        if src.is_dir() and out.is_relative_to(src):
            raise ConfigError(f"--out {config.out} is inside the source folder {source}: "
                              "outputs are never written inside a source; choose an output "
                              "folder outside it")
        if src.is_relative_to(out) and not config.allow_source_inside_out:
            raise ConfigError(f"the source {source} is inside --out {config.out}: earlier "
                              "results there would be retouched and paid for again; choose "
                              "another --out (or set allow_source_inside_out = true)")
    if len(away) == len(config.sources):
        raise ConfigError(away[0])
    if there(out, "--out") and not out.is_dir():
        raise ConfigError(f"--out {config.out} exists and is not a folder")


def prepare_out(config: RunConfig) -> Path:
    """Create the output folder and prove it can be written, and that its disk (and the
    ledger's) has room, before anything is sent."""
    out = config.out.expanduser().resolve()
    for folder in config.written_folders:
        for place in (folder, *folder.parents):  # up to the first that is there
            if there(place, "the folder"):
                break
    if not out.exists() and not out.parent.is_dir():
        # --out is made, never the folders above it: a missing one is most often the mount
        # point of a drive not plugged in, where a new ledger would pay again for every photo.
        raise ConfigError(f"--out {config.out}: the folder it would be made in, {out.parent}, "
                          "does not exist (is its drive or share mounted?); create it first "
                          "if it is meant")
    for folder in config.written_folders:
        if (gone := unmounted_mount_point(folder)) is not None:
            raise ConfigError(f"{folder} is on {gone.point}, {gone.why}, and nothing is "
                              "mounted there now: mount it first (a run now would start a new "
                              "ledger on the disk beneath and pay again for every photo"
                              f"{gone.otherwise})")
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out / STATE_DIR):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to the output folder {config.out}: "
                          f"{exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):  # its state folder may be writable alone
        raise ConfigError(f"cannot write to the output folder {config.out}: "
                          f"{os.strerror(errno.EACCES)}")
    if (short := short_of_room(config.written_folders)) is not None:
        raise ConfigError(f"{short}: free some space first")
    return out

