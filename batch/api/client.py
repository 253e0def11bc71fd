"""Async HTTP client for the three API calls and the result download, on httpx.

Two separate clients: the API host's carries the key in its default headers and never follows
redirects (a header set on the client would survive a cross-host redirect); the result host's
has no key at all, so the key cannot reach it whatever URLs the server sends. Both take proxy
settings from the environment (``HTTPS_PROXY``, ``NO_PROXY``...); httpx reads no ``~/.netrc``.

Every failure is classified here, once, into an :class:`ApiError` kind. For an upload the line
that matters is whether the request may have reached the server: only a failure to get a
connection at all is "not sent"; anything after that may have been charged ("ambiguous").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any, TypedDict
from urllib.parse import quote

import httpx

from batch import apispec
from batch.api.bandwidth import UploadPace
from batch.api.errors import (
    CHECK_BASE,
    ApiError,
    Endpoint,
    ErrorKind,
    classify,
    error_fields,
)
from batch.api.ratelimit import RateLimiter
from batch.api.retry import backoff_delay, parse_retry_after
from batch.options import Options
from batch.secret import Secret

USER_AGENT = "skinbatch/0.1 (+https://pypi.org/project/skinbatch)"
#: A retouched result larger than this is refused (a portrait is a few MB at most).
MAX_RESULT_BYTES = 64 * 1024 * 1024
#: Reads of the balance (the first and its retries), and the failures worth another.
BALANCE_READS = 4
RETRIED = frozenset({ErrorKind.TRANSIENT, ErrorKind.RATE_LIMITED, ErrorKind.NOT_SENT,
                     ErrorKind.UNREACHABLE})
CHUNK = 256 * 1024
#: Raised before any byte of the request can have left: no connection was made (refused,
#: DNS, TLS handshake, a proxy that refused the tunnel, no pooled connection free in time).
NEVER_CONNECTED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)
#: Bytes of an upload's body a write: the write timeout bounds a stall of this many.
UPLOAD_SLICE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    #: Submits are generous: a slow upload must not be mistaken for a lost answer.
    submit: float = 180.0
    query: float = 30.0
    download: float = 120.0
    #: Longest a single write may stall (a server that stopped reading an upload).
    write: float = 60.0


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


class _Upload:
    """An upload's body for httpx, which knows whether its last byte was handed over."""

    def __init__(self, pieces: AsyncIterator[bytes]) -> None:
        self._pieces = pieces
        self.whole = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self._pieces:
            yield piece
        self.whole = True  # asked for more after the last piece was written


def _untrusted(exc: BaseException) -> str | None:
    """Why the server's TLS certificate was refused, if that is what ``exc`` comes down to
    (a proxy that inspects TLS signs with its own authority, unknown to this machine)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _transport_words(exc: httpx.TransportError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _download_failed(exc: httpx.TransportError, url: str) -> str:
    """What a failed download says: a host never reached is named (results come from a host
    of their own, which a firewall or DNS filter that lets the API through may block)."""
    if not isinstance(exc, NEVER_CONNECTED):
        return f"the download broke off ({_transport_words(exc)})"
    try:
        host = exc.request.url.host
    except RuntimeError:  # no request attached
        host = httpx.URL(url).host
    if (why := _untrusted(exc)) is not None:
        return (f"the result host {host}'s TLS certificate is not trusted here ({why}): where a "
                "proxy inspects TLS, point SSL_CERT_FILE at its certificate bundle")
    return (f"could not connect to the result host {host} ({_transport_words(exc)}; a "
            "firewall or DNS filter that lets the API through may block it)")


def _transport_kind(exc: httpx.TransportError) -> ErrorKind:
    """No connection made at all is the network's failure; any other, the exchange's."""
    return ErrorKind.UNREACHABLE if isinstance(exc, NEVER_CONNECTED) else ErrorKind.TRANSIENT


def _upload_failed(exc: httpx.TransportError, whole: bool) -> ApiError:
    """What a transport error means for an upload. The API can have charged it only if its
    whole body went out; the error's type cannot say so, as httpcore reads for an answer
    after a failed write and the error seen is then the read's."""
    if _transport_kind(exc) is ErrorKind.UNREACHABLE:
        return ApiError(ErrorKind.UNREACHABLE, f"could not connect to the API: {exc}")
    if not whole:
        return ApiError(ErrorKind.NOT_SENT,
                        f"the connection failed while the upload was being sent "
                        f"({_transport_words(exc)}); it never reached the API whole, so it was "
                        "not charged")
    return ApiError(ErrorKind.AMBIGUOUS,
                    f"the upload was sent but its answer was lost ({_transport_words(exc)}); "
                    "the API may have charged for it")


async def _slices(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), UPLOAD_SLICE):
        yield body[start:start + UPLOAD_SLICE]


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _web_page(response: httpx.Response) -> bool:
    kind: str = response.headers.get("content-type", "")
    return kind.lower().startswith(("text/html", "application/xhtml"))


class _Ids(TypedDict):
    request_id: str | None
    log_id: str | None


def _ids(body: dict[str, Any]) -> _Ids:
    _, _, request_id, log_id = error_fields(body)
    return {"request_id": request_id or None, "log_id": log_id or None}


def _task_status(body: dict[str, Any]) -> int | None:
    """``task_status`` at the top or under ``data``, as an int (some answers send a string)."""
    data = body.get("data")
    status = body.get("task_status", data.get("task_status") if isinstance(data, dict) else None)
    if isinstance(status, str) and status.strip().lstrip("-").isdigit():
        return int(status)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def _result_urls(body: dict[str, Any]) -> list[str]:
    data = body.get("data")
    urls = data.get("result_urls") if isinstance(data, dict) else None
    if isinstance(urls, str):
        urls = [urls]
    if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
        return list(urls)
    return []


class ApiClient:
    """The three API calls and the download, each classified into success or an ApiError.

    Pacing is the caller's: take a token from :attr:`limiter` before each API call (the
    submitter does so *before* committing ``submitting``, so waiting is never mistaken for a
    lost answer). The client only slows the limiter down when the server answers 429.
    Close it with :meth:`aclose`.
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
        self.limiter = limiter or RateLimiter()
        #: Caps the bytes a second this client's uploads send together (None: no cap).
        self.upload_pace: UploadPace | None = None
        self.timeouts = timeouts
        self.max_result_bytes = max_result_bytes
        self._base = base_url.rstrip("/")
        self._query_timeout = self._timeout(timeouts.query)
        self._submit_timeout = self._timeout(timeouts.submit)
        tls = httpx.create_ssl_context()  # loading the CA bundle once, not per client
        self._api = httpx.AsyncClient(
            headers={apispec.KEY_HEADER: key.reveal(), "user-agent": USER_AGENT},
            limits=httpx.Limits(max_connections=max_connections), verify=tls,
            timeout=self._query_timeout, follow_redirects=False)
        self._results = httpx.AsyncClient(
            headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
            limits=httpx.Limits(max_connections=max_downloads), verify=tls,
            timeout=self._timeout(timeouts.download), follow_redirects=True, max_redirects=5)

    def _timeout(self, read: float) -> httpx.Timeout:
        """``read``: the longest silence while waiting for or reading an answer."""
        t = self.timeouts
        return httpx.Timeout(connect=t.connect, read=read, write=t.write, pool=t.connect)

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._results.aclose()

    async def _call(self, method: str, path: str, endpoint: Endpoint, *,
                    files: dict[str, tuple[str, bytes, str]] | None = None,
                    data: dict[str, str] | None = None,
                    timeout: httpx.Timeout | None = None) -> dict[str, Any]:
        """One API request, its answer read whole and classified. An upload's transport
        error is classified here, where its body knows how far it went; a query's propagates
        for the caller to classify, as what it means depends on the call."""
        request = self._api.build_request(method, self._base + path, files=files, data=data,
                                          timeout=timeout or self._query_timeout)
        turn, upload = None, None
        if files:
            # The multipart body is assembled once and sent in slices: streamed as httpx
            # builds it, each part's boundary, headers and value goes out as a write of its
            # own, and each write through httpcore's anyio stream costs more CPU than the
            # whole upload otherwise; sent in one write, the write timeout would bound the
            # whole upload rather than a stall, and a slow line would never get one through.
            await request.aread()
            if self.upload_pace is not None:
                turn = await self.upload_pace.turn()
                upload = _Upload(self.upload_pace.stream(request.content, turn))
            else:
                upload = _Upload(_slices(request.content))
            # The length stays declared: not chunked.
            request = httpx.Request(method, request.url, headers=request.headers,
                                    content=upload, extensions=request.extensions)
        try:
            response = await self._api.send(request)
        except httpx.TransportError as exc:
            if upload is None:
                raise
            raise _upload_failed(exc, upload.whole) from exc
        finally:
            if turn is not None:
                turn.release()
        if response.is_redirect:  # the request was not taken: nothing was charged
            raise ApiError(ErrorKind.ACCOUNT, "the API address answers with a redirect (to "
                           f"{response.headers.get('location', 'nowhere')}), not as the API: "
                           f"{CHECK_BASE}", http_status=response.status_code)
        body = _json(response.content)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        error = classify(response.status_code, body, endpoint, retry_after=retry_after)
        if error is not None:
            if error.kind is ErrorKind.RATE_LIMITED:
                self.limiter.rate_limited(retry_after)
            raise error
        if body is None and endpoint == "credits" and _web_page(response):
            # Read before the first upload: whatever answers with a page is not the API.
            raise ApiError(ErrorKind.ACCOUNT, "the API address answers with a web page, not "
                           f"as the API: {CHECK_BASE} (or a captive portal or a proxy's login "
                           "page stands in the way)", http_status=200)
        if body is None:
            kind = ErrorKind.AMBIGUOUS if endpoint == "submit" else ErrorKind.TRANSIENT
            raise ApiError(kind, "the API answered 200 with a body that is not JSON",
                           http_status=200)
        return body

    async def submit(self, payload: bytes, filename: str, content_type: str,
                     options: Options) -> Submitted:
        body = await self._call("POST", apispec.SUBMIT_PATH, "submit",
                                files={"image": (filename, payload, content_type)},
                                data=options.form_fields(), timeout=self._submit_timeout)
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            data = body.get("data")
            task_id = data.get("task_id") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise ApiError(ErrorKind.AMBIGUOUS, "the API accepted the upload without a task_id",
                           http_status=200, **_ids(body))
        return Submitted(task_id, **_ids(body))

    async def query(self, task_id: str) -> TaskStatus:
        try:
            # The query string written here: httpx's merging of params costs a sixth of a
            # status query's CPU, and there is one per task at least.
            path = f"{apispec.QUERY_PATH}?task_id={quote(task_id, safe='')}"
            body = await self._call("GET", path, "query")
        except httpx.TransportError as exc:
            raise ApiError(ErrorKind.TRANSIENT,
                           f"status query failed: {_transport_words(exc)}") from exc
        status = _task_status(body)
        if status is None:
            raise ApiError(ErrorKind.TRANSIENT, "the status answer has no task_status",
                           http_status=200, **_ids(body))
        urls: list[str] = []
        if status == apispec.TASK_COMPLETED:
            urls = _result_urls(body)
            if not urls:
                raise ApiError(ErrorKind.TRANSIENT, "the task is complete but has no result URL",
                               http_status=200, **_ids(body))
        elif status not in (apispec.TASK_QUEUED, apispec.TASK_PROCESSING):
            code, message, _, _ = error_fields(body)
            raise ApiError(ErrorKind.PERMANENT,
                           message or f"the task failed (task_status {status})",
                           http_status=200, code=code or f"TASK_STATUS_{status}", **_ids(body))
        return TaskStatus(status, urls, **_ids(body))

    async def credits(self) -> float | None:
        """The account's remaining credits, or None where the answer does not say."""
        try:
            body = await self._call("GET", apispec.CREDITS_PATH, "credits")
        except httpx.TransportError as exc:
            # Read before the first upload: a certificate this machine does not trust is
            # refused the same way on every request, and no retry mends it.
            if (why := _untrusted(exc)) is not None:
                raise ApiError(ErrorKind.ACCOUNT, f"the API's TLS certificate is not trusted "
                               f"here ({why}): where a proxy inspects TLS, point SSL_CERT_FILE "
                               "at its certificate bundle") from exc
            raise ApiError(_transport_kind(exc),
                           f"credits query failed: {_transport_words(exc)}") from exc
        for holder in (body.get("data"), body):
            if isinstance(holder, dict):
                for key in ("credits", "remaining_credits", "balance", "quota"):
                    value = holder.get(key)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        return float(value)
        return None

    async def balance(self) -> float | None:
        """:meth:`credits` at the request pace, asked again with backoff (``Retry-After``
        honoured) after a 429 or a transient failure, up to :data:`BALANCE_READS` times: what
        a run may spend is decided on it."""
        reads = 0
        while True:
            await self.limiter.acquire()
            reads += 1
            try:
                return await self.credits()
            except ApiError as error:
                if error.kind not in RETRIED or reads == BALANCE_READS:
                    raise
                await asyncio.sleep(max(error.retry_after or 0.0, backoff_delay(reads - 1)))

    async def download(self, url: str, sink: IO[bytes]) -> Downloaded:
        """Stream ``url`` into ``sink``, checking scheme, status, declared length and size cap.
        The URL is sent as the server wrote it: result links are often signed, and httpx
        keeps their percent-escapes as they are."""
        if not url.lower().startswith(("http://", "https://")):
            raise ApiError(ErrorKind.PERMANENT, f"refusing a result URL that is not http(s): "
                                                f"{url[:80]}")
        try:
            async with self._results.stream("GET", url) as response:
                return await self._receive(response, sink)
        except httpx.UnsupportedProtocol as exc:
            raise ApiError(ErrorKind.PERMANENT,
                           "the result host redirected to a URL that is not http(s)") from exc
        except httpx.TooManyRedirects as exc:
            raise ApiError(ErrorKind.PERMANENT, "the result host redirected too many times") \
                from exc
        except httpx.InvalidURL as exc:
            raise ApiError(ErrorKind.PERMANENT, f"the result URL is malformed: {url[:80]}") \
                from exc
        except httpx.TransportError as exc:
            raise ApiError(_transport_kind(exc), _download_failed(exc, url)) from exc

    async def _receive(self, response: httpx.Response, sink: IO[bytes]) -> Downloaded:
        status = response.status_code
        if status in (401, 403, 404, 410):
            raise ApiError(ErrorKind.EXPIRED, "the result host refused the link",
                           http_status=status)
        if status != 200:
            kind = ErrorKind.TRANSIENT if status >= 500 or status == 429 else ErrorKind.PERMANENT
            raise ApiError(kind, f"the result host answered HTTP {status}", http_status=status)
        declared = response.headers.get("content-length")
        expected = int(declared) if declared and declared.isdigit() else None
        if expected is not None and expected > self.max_result_bytes:
            raise ApiError(ErrorKind.PERMANENT, f"the result is {expected} bytes, over the "
                                                f"{self.max_result_bytes}-byte cap")
        digest = hashlib.sha256()
        size = 0
        async for chunk in response.aiter_raw(CHUNK):
            size += len(chunk)
            if size > self.max_result_bytes:
                raise ApiError(ErrorKind.PERMANENT,
                               f"the result is over the {self.max_result_bytes}-byte cap")
            digest.update(chunk)
            sink.write(chunk)
        if expected is not None and size != expected:
            raise ApiError(ErrorKind.TRANSIENT,
                           f"the download was cut short: {size} of {expected} bytes")
        if size == 0:
            raise ApiError(ErrorKind.TRANSIENT, "the result host sent an empty file")
        return Downloaded(size, digest.hexdigest())
