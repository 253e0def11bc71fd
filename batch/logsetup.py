"""Logging to stderr, with the key masked as a last line of defence."""

from __future__ import annotations

import logging

from batch.secret import RedactingFilter, Secret


def configure(level: int, secret: Secret | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    if secret is not None:
        handler.addFilter(RedactingFilter(secret))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
