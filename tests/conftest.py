from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from batch.emulator import Emulator, EmulatorConfig, Faults
from tests import slowdisk

PG_ADMIN_URL = os.environ.get("SKINBATCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
API_KEY = "sk-test-" + "c4n4ry" * 4
ROOT = Path(__file__).resolve().parent.parent
#: The ``make_emulator`` fixture: an emulator started with these EmulatorConfig fields.
MakeEmulator = Callable[..., Emulator]


@pytest.fixture(autouse=True)
def own_ledger_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's runs keep their own list of the ledgers they wrote (batch.elsewhere), as
    the tests send the same pictures over and over and each expects to pay for them."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "user-state"))


def fast_config(**overrides: Any) -> EmulatorConfig:
    values: dict[str, Any] = {"api_keys": frozenset({API_KEY}), "queue_seconds": 0.05,
                              "process_seconds": 0.1}
    values.update(overrides)
    return EmulatorConfig(**values)


@pytest.fixture
def make_emulator() -> Iterator[MakeEmulator]:
    started: list[Emulator] = []

    def factory(**overrides: Any) -> Emulator:
        faults = overrides.pop("faults", None)
        config = fast_config(**overrides)
        if faults is not None:
            config.faults = faults if isinstance(faults, Faults) else Faults(**faults)
        emulator = Emulator(config).start()
        started.append(emulator)
        return emulator

    yield factory
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emulator(make_emulator: MakeEmulator) -> Emulator:
    return make_emulator()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


#: Bytecode of the package for the runs the tests start, shared by every test and worker.
PYCACHE = str(Path(tempfile.gettempdir()) / f"skinbatch-tests-pycache-{os.getuid()}")


def cli_env(emulator: Emulator | None, key: str | None = API_KEY,
            extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AILAB_", "SKINBATCH_"))}
    if emulator is not None:
        env["AILAB_API_BASE"] = emulator.api_base
    if key is not None:
        env["AILAB_API_KEY"] = key
    env["PYTHONPATH"] = str(ROOT)
    # Each of the suite's hundreds of runs would otherwise compile the package from source
    # (an editable install has no bytecode of it); kept out of the checkout.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    env.update(extra or {})
    return env


FAST_FLAGS = ["--poll-interval", "0.05", "--max-qps", "200", "--no-progress"]


def drop_root_file_access() -> None:
    """In the child: give up root's power to read any file (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH leave the bounding set), so chmod 000 means unreadable as for a user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_cli(args: list[str], emulator: Emulator | None, *, key: str | None = API_KEY,
            extra_env: dict[str, str] | None = None, timeout: float = 120,
            as_plain_user: bool = False) -> CliResult:
    proc = subprocess.run([sys.executable, "-m", "batch", *args], capture_output=True,
                          text=True, errors="surrogateescape",  # paths as they are
                          env=cli_env(emulator, key, extra_env), timeout=timeout,
                          stdin=subprocess.DEVNULL,
                          preexec_fn=drop_root_file_access if as_plain_user else None)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def wait_for(condition: Callable[[], object], timeout: float = 60.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def popen_cli(args: list[str], emulator: Emulator | None, *,
              extra_env: dict[str, str] | None = None,
              as_plain_user: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env=cli_env(emulator, API_KEY, extra_env),
                            preexec_fn=drop_root_file_access if as_plain_user else None)


def stopped(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Stop a watch as a service manager does; it ends cleanly (exit 130)."""
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    return stdout, stderr


def pg_available() -> bool:
    try:
        with create_engine(PG_ADMIN_URL).connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:
        return False


@contextmanager
def _server_in_use(exclusive: bool) -> Iterator[None]:
    """Tests run in parallel (pytest-xdist, and any other checkout's suite on this machine):
    every test that uses the PostgreSQL server holds this lock shared, and the one that
    restarts the server holds it alone."""
    path = Path(tempfile.gettempdir()) / "skinbatch-tests-postgresql.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with _server_in_use(request.node.get_closest_marker("restarts_postgresql") is not None):
        yield from _fresh_database()


def _fresh_database() -> Iterator[str]:
    if not pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (CI needs it)")
        pytest.skip("PostgreSQL not reachable")
    name = f"skinbatch_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def slowdisk_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/slowdisk.c, built with the machine's C compiler."""
    try:
        return slowdisk.build(tmp_path_factory.mktemp("slowdisk"))
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the slow-disk shim: {exc}")
        pytest.skip(f"no C compiler to build the slow-disk shim: {exc}")


@pytest.fixture(scope="session")
def slow_disk(slowdisk_library: Path) -> dict[str, str]:
    """Environment for a child process whose every fsync takes 20 ms more, as with a ledger
    on a spinning disk."""
    return slowdisk.environment(slowdisk_library)


@contextmanager
def loopback_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on loopback (a proxy, a relay, a gateway) for the block's length;
    yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
