"""Reading the API's answers: every outcome is success or one :class:`ApiError` kind."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from batch import apispec

Endpoint = Literal["submit", "query", "credits", "download"]


class ErrorKind(StrEnum):
    PERMANENT = "permanent"
    """Wrong for this image or task, for good: record the reason and move on."""
    TRANSIENT = "transient"
    """The server or the network hiccupped: retry with backoff."""
    RATE_LIMITED = "rate_limited"
    """Too many requests: slow everyone down and retry."""
    ACCOUNT = "account"
    """Bad key, locked account, gone endpoint or no credits: nothing else can succeed."""
    AMBIGUOUS = "ambiguous"
    """A submit whose upload went out but whose answer was lost: maybe charged."""
    NOT_SENT = "not_sent"
    """The request provably never reached the server whole: free of charge to retry."""
    UNREACHABLE = "unreachable"
    """No connection could be made at all (refused, no route, DNS, a connect timeout): the
    network's failure, not the request's, so a retry costs the request none of its attempts."""
    EXPIRED = "expired"
    """The result link is past its life, or the API does not know the task (lost on its side):
    either way the result is out of reach, and ``on_expired`` decides."""


class ApiError(Exception):
    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        log_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.http_status = http_status
        self.code = code
        self.request_id = request_id
        self.log_id = log_id
        self.retry_after = retry_after

    @property
    def out_of_credits(self) -> bool:
        return self.code == apispec.NOT_ENOUGH_CREDITS

    def describe(self, ids: bool = True) -> str:
        """The message, code and HTTP status, and (``ids``) the request's ids to quote, which
        a reason shared by many photos leaves out."""
        parts = [self.message]
        if self.code:
            parts.append(f"code {self.code}")
        if self.http_status and f"HTTP {self.http_status}" not in self.message:
            parts.append(f"HTTP {self.http_status}")
        if ids:
            parts += [f"{k}={v}" for k, v in (("request_id", self.request_id),
                                              ("log_id", self.log_id)) if v]
        return " · ".join(parts)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def error_fields(body: dict[str, Any]) -> tuple[str, str, str, str]:
    """(code, message, request_id, log_id) from both the new and the older answer shapes."""
    detail = body.get("error_detail")
    detail = detail if isinstance(detail, dict) else {}
    code = _text(detail.get("code")) or _text(body.get("error_code_str"))
    message = (_text(detail.get("message")) or _text(detail.get("code_message"))
               or _text(body.get("error_msg")))
    return code, message, _text(body.get("request_id")), _text(body.get("log_id"))


#: The advice of an error that says the address is not the API's: no key or account is at
#: fault then.
CHECK_BASE = "check --api-base"

#: The ``error_code`` of a job whose uploads the API failed (a 5xx, a body cut short: neither
#: is a charge) up to the attempt limit while it answered otherwise: the backend out behind a
#: gateway that answers, or the photo itself. The next run tries it once more, which tells
#: the two apart without a person (see ``batch.requeue.try_again_given_up``).
UPLOADS_FAILED = "UPLOADS_FAILED"

ACCOUNT_CODES = frozenset({apispec.APPLICATION_NOT_EXISTS, apispec.USER_NOT_EXISTS,
                           apispec.USER_LOCKED, apispec.NOT_ENOUGH_CREDITS})


def _effective_status(status: int, body: dict[str, Any], code: str) -> int:
    """The HTTP status the answer means: older answers say 200 with an error in the body."""
    legacy = body.get("error_code")
    if status == 200 and isinstance(legacy, int) and legacy != 0:
        status = legacy if 400 <= legacy < 600 else 400
    if status == 200 and code in ACCOUNT_CODES:
        status = 429 if code == apispec.NOT_ENOUGH_CREDITS else 401
    return status


def _kind(status: int, code: str, endpoint: Endpoint) -> tuple[ErrorKind, str]:
    """What a failed answer means, and the words for it when the answer has none."""
    if code == apispec.NOT_ENOUGH_CREDITS:
        return ErrorKind.ACCOUNT, "the account is out of credits"
    if status == 401 or code in (apispec.APPLICATION_NOT_EXISTS, apispec.USER_NOT_EXISTS):
        return ErrorKind.ACCOUNT, "the API key was not accepted"
    if status == 403:
        return ErrorKind.ACCOUNT, "the account is locked or not allowed to use this API"
    if status == 404 and endpoint == "query" and code != apispec.AI_NOT_EXISTS:
        return ErrorKind.EXPIRED, "the API no longer knows this task (expired or lost)"
    if status == 404 and (endpoint != "query" or code == apispec.AI_NOT_EXISTS):
        return ErrorKind.ACCOUNT, f"the API endpoint does not exist ({CHECK_BASE})"
    if status == 429:
        return ErrorKind.RATE_LIMITED, "rate limited by the API"
    if status == 504 and endpoint == "submit":  # the gateway gave up, the API may not have
        return ErrorKind.AMBIGUOUS, ("the API's gateway stopped waiting for the upload's "
                                     "answer (HTTP 504): it may have been charged")
    if status == 408 or status >= 500:
        return ErrorKind.TRANSIENT, f"the API answered HTTP {status}"
    return ErrorKind.PERMANENT, "the API refused the request"


def classify(
    status: int,
    body: dict[str, Any] | None,
    endpoint: Endpoint,
    *,
    retry_after: float | None = None,
) -> ApiError | None:
    """None for success; otherwise the error, classified as API.md prescribes."""
    body = body or {}
    code, message, request_id, log_id = error_fields(body)
    status = _effective_status(status, body, code)
    if status == 200:
        return None
    kind, default = _kind(status, code, endpoint)
    if kind is ErrorKind.EXPIRED and message:  # the server's words say too little alone
        message = f"{default}: {message}"
    return ApiError(kind, message or default, http_status=status, code=code or None,
                    request_id=request_id or None, log_id=log_id or None,
                    retry_after=retry_after)
