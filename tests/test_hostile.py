"""Hostile input never crashes a run, never costs a request, and always gets its own reason."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from batch.emulator import Emulator
from tests import hostile
from tests.conftest import FAST_FLAGS, popen_cli, run_cli


def test_every_bad_input_gets_a_specific_reason_and_costs_nothing(
        tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    expected, valid = hostile.build(src, tmp_path / "outside")
    assert len(expected) >= 12
    args = ["run", str(src), "--out", str(out), "--smart-skin", *FAST_FLAGS]

    # No budget: uploads start while the scan goes on, and one sent before the kill would
    # be the photo culled after it.
    scanned_then_killed = popen_cli([*args, "--max-credits", "0"], emulator,
                                    extra_env={"SKINBATCH_CRASH_AFTER": "scanned:1"})
    scanned_then_killed.communicate(timeout=60)
    assert scanned_then_killed.returncode == -signal.SIGKILL
    (src / "vanishes.jpg").unlink()  # culled after the scan: not sent, not listed

    result = run_cli(args, emulator, as_plain_user=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert emulator.stats["submits"] == len(valid), "only the valid images may be sent"
    for name in valid:
        assert (out / name).is_file()

    status = run_cli(["status", "--out", str(out), "--json"], None)
    problems = {Path(p["path"]).name: p["reason"] for p in json.loads(status.stdout)["problems"]}
    assert set(problems) == set(expected)
    for name, fragment in expected.items():
        assert fragment in problems[name], (name, problems[name])
    assert not (out / "escape.jpg").exists()
