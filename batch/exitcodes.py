"""The process exit codes of the CLI contract (scripts and monitoring rely on them)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    """Every image is done."""
    SOME_FAILED = 1
    """The run finished, but some images failed, were rejected or need a person."""
    USAGE = 2
    """Bad arguments or configuration; nothing was sent."""
    ACCOUNT = 3
    """Stopped by an account-level error: bad key, locked account, no credits."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C, SIGTERM, SIGHUP without nohup); state is saved."""
