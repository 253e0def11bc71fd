"""Async HTTP client for the three API calls and the result download.

Two separate connection pools: the API host's carries the key in its default headers and never
follows redirects (a custom header would survive a cross-host redirect); the result host's has
no key at all, so the key cannot reach it whatever URLs the server sends.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from batch import apispec
from batch.api.errors import ApiError, Endpoint, ErrorKind, classify, error_fields
from batch.api.ratelimit import RateLimiter
from batch.api.retry import parse_retry_after
from batch.options import Options
from batch.secret import Secret

USER_AGENT = "skinbatch/0.1 (+https://pypi.org/project/skinbatch)"
#: A retouched result larger than this is refused (a portrait is a few MB at most).
MAX_RESULT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    #: Submits are generous: a slow upload must not be mistaken for a lost answer.
    submit: float = 180.0
    query: float = 30.0
    download: float = 120.0


@dataclass(frozen=True, slots=True)
class Submitted:
    task_id: str
    request_id: str | None
    log_id: str | None


@dataclass(frozen=True, slots=True)
class TaskStatus:
    status: int
    result_urls: list[str]
    request_id: str | None
    log_id: str | None


@dataclass(frozen=True, slots=True)
class Downloaded:
    size: int
    sha256: str


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


class ApiClient:
    """The three API calls and the download, each classified into success or an ApiError.

    Pacing is the caller's: take a token from :attr:`limiter` before each API call (the
    submitter does so *before* committing ``submitting``, so waiting is never mistaken for a
    lost answer). The client only slows the limiter down when the server answers 429.
    """

    def __init__(
        self,
        base_url: str,
        key: Secret,
        *,
        limiter: RateLimiter | None = None,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = 12,
        max_downloads: int = 4,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ) -> None:
        self.limiter = limiter or RateLimiter(10.0)
        self.timeouts = timeouts
        self.max_result_bytes = max_result_bytes
        # Pools sized to need: httpcore checks every pooled connection on each request.
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        download_limits = httpx.Limits(max_connections=max_downloads,
                                       max_keepalive_connections=max_downloads)
        self._api = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={apispec.KEY_HEADER: key.reveal(), "user-agent": USER_AGENT},
            follow_redirects=False,
            limits=limits,
            timeout=httpx.Timeout(timeouts.query, connect=timeouts.connect),
        )
        self._results = httpx.AsyncClient(
            headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
            follow_redirects=True,
            max_redirects=5,
            limits=download_limits,
            timeout=httpx.Timeout(timeouts.download, connect=timeouts.connect),
        )

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._results.aclose()

    def _answer(self, response: httpx.Response, endpoint: Endpoint) -> dict[str, Any]:
        body = _json(response)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        error = classify(response.status_code, body, endpoint, retry_after=retry_after)
        if error is not None:
            if error.kind is ErrorKind.RATE_LIMITED:
                self.limiter.pause(retry_after if retry_after is not None else 1.0)
            raise error
        if body is None:
            kind = ErrorKind.AMBIGUOUS if endpoint == "submit" else ErrorKind.TRANSIENT
            raise ApiError(kind, "the API answered 200 with a body that is not JSON",
                           http_status=200)
        return body

    async def submit(self, payload: bytes, filename: str, content_type: str,
                     options: Options) -> Submitted:
        request = self._api.build_request(
            "POST", apispec.SUBMIT_PATH,
            files={"image": (filename, payload, content_type)},
            data=options.form_fields(),
            timeout=httpx.Timeout(self.timeouts.submit, connect=self.timeouts.connect),
        )
        # Assemble the multipart body once: streamed, httpx writes each field fragment with
        # its own send() (~90 syscalls per upload). The payload is at most 10 MB.
        request.read()
        try:
            response = await self._api.send(request)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ApiError(ErrorKind.NOT_SENT, f"could not connect to the API: {exc}") from exc
        except (httpx.WriteError, httpx.WriteTimeout) as exc:
            raise ApiError(ErrorKind.NOT_SENT,
                           f"the upload broke off before it was complete: {exc}") from exc
        except httpx.TransportError as exc:
            raise ApiError(
                ErrorKind.AMBIGUOUS,
                f"the upload was sent but its answer was lost ({type(exc).__name__}); "
                "the API may have charged for it",
            ) from exc
        body = self._answer(response, "submit")
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            data = body.get("data")
            task_id = data.get("task_id") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id:
            _, _, request_id, log_id = error_fields(body)
            raise ApiError(ErrorKind.AMBIGUOUS, "the API accepted the upload without a task_id",
                           http_status=200, request_id=request_id or None, log_id=log_id or None)
        _, _, request_id, log_id = error_fields(body)
        return Submitted(task_id, request_id or None, log_id or None)

    async def query(self, task_id: str) -> TaskStatus:
        try:
            response = await self._api.get(apispec.QUERY_PATH, params={"task_id": task_id})
        except httpx.TransportError as exc:
            raise ApiError(ErrorKind.TRANSIENT, f"status query failed: {type(exc).__name__}") \
                from exc
        body = self._answer(response, "query")
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        assert isinstance(data, dict)
        status = body.get("task_status", data.get("task_status"))
        _, _, request_id, log_id = error_fields(body)
        if isinstance(status, str) and status.strip().lstrip("-").isdigit():
            status = int(status)
        if not isinstance(status, int) or isinstance(status, bool):
            raise ApiError(ErrorKind.TRANSIENT, "the status answer has no task_status",
                           http_status=200, request_id=request_id or None, log_id=log_id or None)
        urls = data.get("result_urls") or []
        if status == apispec.TASK_COMPLETED:
            if isinstance(urls, str):
                urls = [urls]
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls) or not urls:
                raise ApiError(ErrorKind.TRANSIENT, "the task is complete but has no result URL",
                               http_status=200, request_id=request_id or None)
        elif status not in (apispec.TASK_QUEUED, apispec.TASK_PROCESSING):
            code, message, _, _ = error_fields(body)
            raise ApiError(ErrorKind.PERMANENT,
                           message or f"the task failed (task_status {status})",
                           http_status=200, code=code or f"TASK_STATUS_{status}",
                           request_id=request_id or None, log_id=log_id or None)
        return TaskStatus(status, list(urls) if status == apispec.TASK_COMPLETED else [],
                          request_id or None, log_id or None)

    async def credits(self) -> float | None:
        """The account's remaining credits, or None where the answer does not say."""
        try:
            response = await self._api.get(apispec.CREDITS_PATH)
        except httpx.TransportError as exc:
            raise ApiError(ErrorKind.TRANSIENT, f"credits query failed: {exc}") from exc
        body = self._answer(response, "credits")
        for holder in (body.get("data"), body):
            if isinstance(holder, dict):
                for key in ("credits", "remaining_credits", "balance", "quota"):
                    value = holder.get(key)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        return float(value)
        return None

    async def download(self, url: str, sink: IO[bytes]) -> Downloaded:
        """Stream ``url`` into ``sink``, checking scheme, status, declared length and size cap."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise ApiError(ErrorKind.PERMANENT, f"refusing a result URL that is not http(s): "
                                                f"{url[:80]}")
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._results.stream("GET", url) as response:
                if response.status_code in (401, 403, 404, 410):
                    raise ApiError(ErrorKind.EXPIRED,
                                   f"the result host answered HTTP {response.status_code}: "
                                   "the link has expired", http_status=response.status_code)
                if response.status_code != 200:
                    kind = (ErrorKind.TRANSIENT if response.status_code >= 500
                            or response.status_code == 429 else ErrorKind.PERMANENT)
                    raise ApiError(kind, f"the result host answered HTTP {response.status_code}",
                                   http_status=response.status_code)
                declared = response.headers.get("content-length")
                expected = int(declared) if declared and declared.isdigit() else None
                if expected is not None and expected > self.max_result_bytes:
                    raise ApiError(ErrorKind.PERMANENT,
                                   f"the result is {expected} bytes, over the "
                                   f"{self.max_result_bytes}-byte cap")
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > self.max_result_bytes:
                        raise ApiError(ErrorKind.PERMANENT,
                                       f"the result is over the {self.max_result_bytes}-byte cap")
                    digest.update(chunk)
                    sink.write(chunk)
        except httpx.UnsupportedProtocol as exc:
            raise ApiError(ErrorKind.PERMANENT,
                           "the result host redirected to a URL that is not http(s)") from exc
        except httpx.TooManyRedirects as exc:
            raise ApiError(ErrorKind.PERMANENT, "the result host redirected too many times") \
                from exc
        except httpx.TransportError as exc:
            raise ApiError(ErrorKind.TRANSIENT,
                           f"the download broke off ({type(exc).__name__})") from exc
        if expected is not None and size != expected:
            raise ApiError(ErrorKind.TRANSIENT,
                           f"the download was cut short: {size} of {expected} bytes")
        if size == 0:
            raise ApiError(ErrorKind.TRANSIENT, "the result host sent an empty file")
        return Downloaded(size, digest.hexdigest())
