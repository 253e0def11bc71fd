"""A non-editable install (a built wheel) must still create and migrate a ledger."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_built_wheel_carries_its_migrations(tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True)
    [wheel] = wheels.glob("skinbatch-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    script = ("import batch, sys; from batch.ledger import open_ledger; "
              "assert batch.__file__.startswith(sys.argv[1]), batch.__file__; "
              "l = open_ledger(sys.argv[2]); print(sorted(l.counts())[:1])")
    result = subprocess.run([sys.executable, "-c", script, str(target),
                             str(tmp_path / "l.sqlite")], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "l.sqlite").stat().st_size > 0
