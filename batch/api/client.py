"""Async HTTP client for the three API calls and the result download, on aiohttp.

aiohttp rather than httpx (the brief's first choice): on asyncio, httpx goes through httpcore and
anyio, and measured 0.93 ms of CPU per request against the emulator where aiohttp, whose HTTP
parser is compiled, needs 0.17 ms; with four requests per image that alone was most of the
client's CPU budget per image (see bench/ and the README's Performance section).

Two separate sessions: the API host's carries the key in its default headers and never follows
redirects (a custom header would survive a cross-host redirect); the result host's has no key at
all, so the key cannot reach it whatever URLs the server sends.

Every failure is classified here, once, into an :class:`ApiError` kind. For an upload the line
that matters is whether the request may have reached the server: only a failure to get a
connection at all is "not sent"; anything after that may have been charged ("ambiguous").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import urllib.request
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from batch import apispec
from batch.api.errors import ApiError, Endpoint, ErrorKind, classify, error_fields
from batch.api.ratelimit import RateLimiter
from batch.api.retry import parse_retry_after
from batch.options import Options
from batch.secret import Secret

USER_AGENT = "skinbatch/0.1 (+https://pypi.org/project/skinbatch)"
#: A retouched result larger than this is refused (a portrait is a few MB at most).
MAX_RESULT_BYTES = 64 * 1024 * 1024
CHUNK = 256 * 1024
#: Bytes a second an upload is allowed before it counts as stalled (256 kbit/s).
MIN_UPLOAD_RATE = 32 * 1024
#: Raised before any byte of the request can have left: the connection was never made (refused,
#: DNS, TLS handshake, or no pooled connection free within the connect timeout).
NEVER_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
#: Everything the transport may raise once a request is under way (aiohttp wraps socket errors
#: in ClientOSError; a total timeout is a bare TimeoutError). Not OSError: an error writing the
#: download to disk is the disk's, and must reach the downloader as such.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


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


@functools.lru_cache(maxsize=64)
def proxy_for(scheme: str, host: str) -> str | None:
    """The proxy the environment names for a host (``HTTPS_PROXY``, ``NO_PROXY``...), looked up
    once per host: aiohttp's own ``trust_env`` re-reads the environment and ~/.netrc on every
    request (8 % of the client's CPU), and would add ~/.netrc credentials to requests."""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(scheme)


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


class ApiClient:
    """The three API calls and the download, each classified into success or an ApiError.

    Pacing is the caller's: take a token from :attr:`limiter` before each API call (the
    submitter does so *before* committing ``submitting``, so waiting is never mistaken for a
    lost answer). The client only slows the limiter down when the server answers 429.
    Create it inside the running event loop; close it with :meth:`aclose`.
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
        self._base = base_url.rstrip("/")
        self._query_timeout = self._timeout(timeouts.query, cap=timeouts.query)
        self._api = aiohttp.ClientSession(
            headers={apispec.KEY_HEADER: key.reveal(), "user-agent": USER_AGENT},
            connector=aiohttp.TCPConnector(limit=max_connections),
            timeout=self._query_timeout,
        )
        base = urlsplit(self._base)
        self._api_proxy = proxy_for(base.scheme, base.hostname or "")
        self._results = aiohttp.ClientSession(
            headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
            connector=aiohttp.TCPConnector(limit=max_downloads),
            timeout=self._timeout(timeouts.download),
            auto_decompress=False,
        )

    def _timeout(self, read: float, *, cap: float | None = None) -> aiohttp.ClientTimeout:
        """A limit on getting a connection (pool wait included) and on every silence while
        reading; ``cap`` also limits the request as a whole, after the connection. API calls
        are capped (aiohttp has no write timeout: a server that stopped reading an upload would
        hold it for ever); a download is not, as a large result on a slow link may take long
        while data keeps arriving."""
        connect = self.timeouts.connect
        return aiohttp.ClientTimeout(total=None if cap is None else connect + cap,
                                     connect=connect + read, sock_connect=connect,
                                     sock_read=read)

    def _submit_timeout(self, size: int) -> aiohttp.ClientTimeout:
        """The upload's own time at a slow uplink's pace (``MIN_UPLOAD_RATE``) on top of the
        answer's: a 10 MB photo over a shared studio line must not be cut off and turned into
        an ambiguous, maybe-charged upload."""
        submit = self.timeouts.submit
        return self._timeout(submit, cap=submit + size / MIN_UPLOAD_RATE)

    async def aclose(self) -> None:
        await self._api.close()
        await self._results.close()

    async def _call(self, method: str, path: str, endpoint: Endpoint, *,
                    params: dict[str, str] | None = None, form: aiohttp.FormData | None = None,
                    timeout: aiohttp.ClientTimeout | None = None) -> dict[str, Any]:
        """One API request, its answer read whole and classified. Transport errors propagate
        for the caller to classify: what they mean depends on the call."""
        data, headers = None, None
        if form is not None:
            # The multipart body assembled once: streamed, aiohttp sends each part's boundary,
            # headers and value with a send() of their own (~40 per upload). At most 10 MB.
            writer = form()
            data, headers = await writer.as_bytes(), {"content-type": writer.content_type}
        async with self._api.request(method, self._base + path, params=params, data=data,
                                     headers=headers, allow_redirects=False,
                                     proxy=self._api_proxy,
                                     timeout=timeout or self._query_timeout) as response:
            raw = await response.read()
            status, header = response.status, response.headers.get("retry-after")
        body = _json(raw)
        retry_after = parse_retry_after(header)
        error = classify(status, body, endpoint, retry_after=retry_after)
        if error is not None:
            if error.kind is ErrorKind.RATE_LIMITED:
                self.limiter.rate_limited(retry_after)
            raise error
        if body is None:
            kind = ErrorKind.AMBIGUOUS if endpoint == "submit" else ErrorKind.TRANSIENT
            raise ApiError(kind, "the API answered 200 with a body that is not JSON",
                           http_status=200)
        return body

    async def submit(self, payload: bytes, filename: str, content_type: str,
                     options: Options) -> Submitted:
        form = aiohttp.FormData()
        form.add_field("image", payload, filename=filename, content_type=content_type)
        for name, value in options.form_fields().items():
            form.add_field(name, value)
        try:
            body = await self._call("POST", apispec.SUBMIT_PATH, "submit", form=form,
                                    timeout=self._submit_timeout(len(payload)))
        except NEVER_CONNECTED as exc:
            raise ApiError(ErrorKind.NOT_SENT, f"could not connect to the API: {exc}") from exc
        except TRANSPORT_ERRORS as exc:
            raise ApiError(
                ErrorKind.AMBIGUOUS,
                f"the upload was sent but its answer was lost ({type(exc).__name__}); "
                "the API may have charged for it",
            ) from exc
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
            body = await self._call("GET", apispec.QUERY_PATH, "query",
                                    params={"task_id": task_id})
        except TRANSPORT_ERRORS as exc:
            raise ApiError(ErrorKind.TRANSIENT, f"status query failed: {type(exc).__name__}") \
                from exc
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
            body = await self._call("GET", apispec.CREDITS_PATH, "credits")
        except TRANSPORT_ERRORS as exc:
            raise ApiError(ErrorKind.TRANSIENT, f"credits query failed: {type(exc).__name__}") \
                from exc
        for holder in (body.get("data"), body):
            if isinstance(holder, dict):
                for key in ("credits", "remaining_credits", "balance", "quota"):
                    value = holder.get(key)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        return float(value)
        return None

    async def download(self, url: str, sink: IO[bytes]) -> Downloaded:
        """Stream ``url`` into ``sink``, checking scheme, status, declared length and size cap.

        The URL is sent as the server wrote it (``encoded=True``): result links are often
        signed, and re-quoting them would break the signature."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ApiError(ErrorKind.PERMANENT, f"refusing a result URL that is not http(s): "
                                                f"{url[:80]}")
        try:
            target = URL(url, encoded=True)
        except ValueError as exc:
            raise ApiError(ErrorKind.PERMANENT, f"the result URL is malformed: {url[:80]}") \
                from exc
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._results.get(target, max_redirects=5, proxy=proxy_for(
                    parts.scheme, parts.hostname or "")) as response:
                if response.status in (401, 403, 404, 410):
                    raise ApiError(ErrorKind.EXPIRED,
                                   f"the result host answered HTTP {response.status}: "
                                   "the link has expired", http_status=response.status)
                if response.status != 200:
                    kind = (ErrorKind.TRANSIENT if response.status >= 500
                            or response.status == 429 else ErrorKind.PERMANENT)
                    raise ApiError(kind, f"the result host answered HTTP {response.status}",
                                   http_status=response.status)
                declared = response.headers.get("content-length")
                expected = int(declared) if declared and declared.isdigit() else None
                if expected is not None and expected > self.max_result_bytes:
                    raise ApiError(ErrorKind.PERMANENT,
                                   f"the result is {expected} bytes, over the "
                                   f"{self.max_result_bytes}-byte cap")
                async for chunk in response.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > self.max_result_bytes:
                        raise ApiError(ErrorKind.PERMANENT,
                                       f"the result is over the {self.max_result_bytes}-byte cap")
                    digest.update(chunk)
                    sink.write(chunk)
        except (aiohttp.NonHttpUrlRedirectClientError,
                aiohttp.InvalidUrlRedirectClientError) as exc:
            raise ApiError(ErrorKind.PERMANENT,
                           "the result host redirected to a URL that is not http(s)") from exc
        except aiohttp.TooManyRedirects as exc:
            raise ApiError(ErrorKind.PERMANENT, "the result host redirected too many times") \
                from exc
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise ApiError(ErrorKind.PERMANENT, f"the result URL is malformed: {url[:80]}") \
                from exc
        except TRANSPORT_ERRORS as exc:
            raise ApiError(ErrorKind.TRANSIENT,
                           f"the download broke off ({type(exc).__name__})") from exc
        if expected is not None and size != expected:
            raise ApiError(ErrorKind.TRANSIENT,
                           f"the download was cut short: {size} of {expected} bytes")
        if size == 0:
            raise ApiError(ErrorKind.TRANSIENT, "the result host sent an empty file")
        return Downloaded(size, digest.hexdigest())
