"""Logging to stderr (text or JSON lines), with the key masked as a last line of defence."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from batch.secret import RedactingFilter, Secret


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: int, secret: Secret | None = None, *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    if secret is not None:
        handler.addFilter(RedactingFilter(secret))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request with its URL (signed result links among them) at INFO;
    # Pillow logs every tag of every TIFF it opens at DEBUG.
    for noisy in ("httpx", "httpcore", "alembic", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
