"""What the result host sends is never trusted: scheme, size and content are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.emulator import Emulator, Faults
from tests.checks import ledger_of
from tests.conftest import FAST_FLAGS, MakeEmulator, run_cli
from tests.imagegen import write_portrait


def run_one(tmp_path: Path, emulator: Emulator, extra_config: str = "") -> tuple[int, str]:
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg")
    config = tmp_path / "c.toml"
    config.write_text("backoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 3\n" + extra_config)
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS],
                     emulator)
    ledger = ledger_of(out)
    problems = ledger.problems()
    ledger.close()
    assert len(problems) <= 1, problems
    assert not any(p.is_file() for p in out.glob("*.jpg")), "nothing may be written"
    return result.returncode, problems[0].reason if problems else ""


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/result.jpg",
                                    "gopher://127.0.0.1:70/1"])
def test_redirects_to_non_http_urls_are_refused(tmp_path: Path, emulator: Emulator,
                                                target: str) -> None:
    emulator.result_redirect = target
    code, reason = run_one(tmp_path, emulator)
    assert code == 1
    assert "not http(s)" in reason


def test_results_over_the_size_cap_are_cut_off(tmp_path: Path, emulator: Emulator) -> None:
    code, reason = run_one(tmp_path, emulator, "max_result_bytes = 2000\n")
    assert code == 1
    assert "cap" in reason


def test_content_that_is_not_an_image_is_never_accepted(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(faults=Faults(download_garbage=1.0))
    code, reason = run_one(tmp_path, emulator)
    assert code == 1
    assert "not a valid image" in reason
    assert emulator.stats["downloads"] == 3
