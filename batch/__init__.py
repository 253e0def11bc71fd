"""skinbatch: batch portrait retouching through a paid asynchronous API, with a crash-safe ledger.

Use it as a library::

    from batch import RunConfig, run_batch, Options
    report = run_batch(RunConfig(sources=(Path("shoot"),), out=Path("retouched"),
                                 options=Options.of(["smart_skin"]), api_key=Secret(key)))

The names are imported on first use, so that importing one module of the package (the CLI,
the emulator) does not first load all of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch.config import RunConfig
    from batch.exitcodes import ExitCode
    from batch.options import Options
    from batch.pipeline import RunReport, run_batch
    from batch.secret import Secret

__all__ = ["ExitCode", "Options", "RunConfig", "RunReport", "Secret", "run_batch"]

_HOMES = {"RunConfig": "batch.config", "ExitCode": "batch.exitcodes", "Options": "batch.options",
          "RunReport": "batch.pipeline", "run_batch": "batch.pipeline", "Secret": "batch.secret"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'batch' has no attribute {name!r}")
