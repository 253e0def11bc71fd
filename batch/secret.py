"""A wrapper that keeps the API key out of reprs, logs, tracebacks and error messages."""

from __future__ import annotations

import logging


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class RedactingFilter(logging.Filter):
    """Last line of defence: masks the key in any log record that somehow carries it."""

    def __init__(self, secret: Secret) -> None:
        super().__init__()
        self._needle = secret.reveal()

    def filter(self, record: logging.LogRecord) -> bool:
        if self._needle and len(self._needle) >= 4:
            message = record.getMessage()
            if self._needle in message:
                record.msg = message.replace(self._needle, "********")
                record.args = None
        return True
