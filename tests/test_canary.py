"""A canary key must appear nowhere: output, logs, tracebacks, ledger, WAL, result host."""

from __future__ import annotations

import signal
from pathlib import Path

from batch.emulator import Faults
from tests.conftest import API_KEY, FAST_FLAGS, MakeEmulator, popen_cli, run_cli
from tests.imagegen import write_portrait


def test_the_key_leaks_nowhere_even_with_faults_and_a_crash(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(faults=Faults(submit_5xx=0.2, query_5xx=0.2, query_drop=0.1,
                                           download_truncate=0.2, submit_drop_after=0.1,
                                           malformed_json=0.05), seed=5)
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(12):
        write_portrait(src / f"{i}.jpg", seed=i)
    config = tmp_path / "c.toml"
    config.write_text("backoff_base = 0.01\nbackoff_cap = 0.1\nmax_attempts = 30\n")
    args = ["run", str(src), "--out", str(out), "--config", str(config), "-v", *FAST_FLAGS]
    crashed = popen_cli(args, emulator, extra_env={"SKINBATCH_CRASH_AFTER": "ready:4"})
    out1, err1 = crashed.communicate(timeout=120)
    assert crashed.returncode == -signal.SIGKILL
    ledger_dir = out / ".skinbatch"
    wal = ledger_dir / "ledger.sqlite-wal"
    assert wal.exists() and wal.stat().st_size > 0
    on_disk_mid_run = b"".join(p.read_bytes() for p in ledger_dir.iterdir() if p.is_file())

    final = run_cli(args, emulator)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "DEBUG" in final.stderr or "INFO" in final.stderr
    on_disk = b"".join(p.read_bytes() for p in ledger_dir.iterdir() if p.is_file())
    texts = [out1, err1, final.stdout, final.stderr]
    assert not any(API_KEY in t for t in texts)
    assert API_KEY.encode() not in on_disk_mid_run + on_disk
    assert emulator.state.result_host_headers
    assert not any(API_KEY in value for headers in emulator.state.result_host_headers
                   for value in headers.values())


def test_the_key_is_not_accepted_on_the_command_line(tmp_path: Path) -> None:
    result = run_cli(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--api-key", "x"],
                     None)
    assert result.returncode == 2
    assert "No such option" in result.stderr
