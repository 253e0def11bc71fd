"""skinbatch: batch portrait retouching through a paid asynchronous API, with a crash-safe ledger.

Use it as a library::

    from batch import RunConfig, run_batch, Options
    report = run_batch(RunConfig(sources=(Path("shoot"),), out=Path("retouched"),
                                 options=Options.of(["smart_skin"]), api_key=Secret(key)))
"""

from batch.config import RunConfig
from batch.exitcodes import ExitCode
from batch.options import Options
from batch.pipeline import RunReport, run_batch
from batch.secret import Secret

__all__ = ["ExitCode", "Options", "RunConfig", "RunReport", "Secret", "run_batch"]
