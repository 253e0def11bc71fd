"""The emulator's two HTTP servers: the API host and a separate result (storage) host."""

from __future__ import annotations

import io
import json
import secrets
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import multipart

from batch import apispec
from batch.emulator.state import EmulatorConfig, EmulatorState, Rejection, Task

#: What a gateway in front of the API answers for it: HTML, no JSON envelope.
GATEWAY_PAGE = ("<html><head><title>{0}</title></head><body><center><h1>{0}</h1></center><hr>"
                "<center>nginx</center></body></html>")
GATEWAY_ERRORS = {502: "502 Bad Gateway", 503: "503 Service Unavailable",
                  504: "504 Gateway Time-out"}
#: How often a server's loop looks for stop(): how long stop() may wait for each.
POLL_SECONDS = 0.05


def _envelope(status: int, code: str = "", message: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "request_id": secrets.token_hex(8),
        "log_id": secrets.token_hex(8),
        "error_code": 0 if status == 200 else status,
        "error_code_str": code,
        "error_msg": message,
        "error_detail": {"status_code": status, "code": code, "code_message": message,
                         "message": message},
        **extra,
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 emulator: Emulator) -> None:
        super().__init__(address, handler)
        self.emulator = emulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (timeout, kill -9) is normal here, not an error to print."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: Headers and body go out as separate writes: without TCP_NODELAY, Nagle plus the
    #: client's delayed ACK add ~40 ms to every sequential request.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def state(self) -> EmulatorState:
        return self.server.emulator.state

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _reject(self, rejection: Rejection, headers: dict[str, str] | None = None) -> None:
        self._json(rejection.status, _envelope(rejection.status, rejection.code,
                                               rejection.message), headers)

    def _gateway(self, status: int) -> None:
        self._send(status, GATEWAY_PAGE.format(GATEWAY_ERRORS[status]).encode(), "text/html")

    def _drop(self) -> None:
        """Close the connection without an answer (a reset as the client sees it)."""
        self.close_connection = True
        self.wfile.flush()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        uplink = self.state.uplink
        if not length or uplink is None:
            return self.rfile.read(length) if length else b""
        started, parts, left = time.monotonic(), [], length
        while left:
            part = self.rfile.read(min(64 * 1024, left))
            if not part:
                break
            uplink.carry(len(part))
            parts.append(part)
            left -= len(part)
        with self.state.lock:
            self.state.upload_spans.append((started, time.monotonic(), length - left))
        return b"".join(parts)


class ApiHandler(_Handler):
    @property
    def kind(self) -> str:
        return "submit" if self.command == "POST" else "query"

    def _common(self) -> bool:
        """Latency, stalls, key check, rate limit and 5xx faults shared by every endpoint."""
        state, faults = self.state, self.state.config.faults
        if state.config.latency:
            time.sleep(state.config.latency)
        if state.chance(faults.stall, self.kind):
            state.stats["stalls"] += 1
            time.sleep(faults.stall_seconds)
        problem = state.key_problem(self.headers.get(apispec.KEY_HEADER))
        if problem is not None:
            state.stats["unauthorized"] += 1
            self._reject(problem)
            return False
        if state.over_rate(self.command == "POST") or state.chance(faults.rate_limit, self.kind):
            headers: dict[str, str] = {}
            if faults.retry_after == "seconds":
                headers["Retry-After"] = "1"
            elif faults.retry_after == "date":
                headers["Retry-After"] = formatdate(time.time() + 1, usegmt=True)
            self._reject(Rejection(429, apispec.RATE_LIMITED, "Request too frequent."), headers)
            return False
        return True

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        state, faults = self.state, self.state.config.faults
        if state.chance(faults.submit_drop_midway, "submit"):
            state.stats["drops_midway"] += 1
            self.rfile.read(min(64 * 1024, int(self.headers.get("Content-Length") or 0)))
            time.sleep(faults.stall_seconds)
            self._drop()  # the unread rest of the body makes the close a reset
            return
        body = self._read_body()
        if path != apispec.SUBMIT_PATH:
            self._reject(Rejection(404, apispec.AI_NOT_EXISTS, "No such API."))
            return
        state.stats["submits"] += 1
        state.timeline.append((time.time(), "submit"))
        if state.config.record_uploads:
            with state.lock:
                state.uploads.append(body)
        if not self._common():
            return
        if state.chance(faults.submit_5xx, "submit"):
            state.stats["faults_5xx"] += 1
            self._gateway(502)
            return
        if state.chance(faults.submit_drop_before, "submit"):
            state.stats["drops_before_charge"] += 1
            self._drop()
            return
        try:
            data, enabled = self._parse_submit(body)
            fmt = state.validate_image(data)
            task = state.create_task(data, fmt, enabled)
        except Rejection as rejection:
            state.stats[f"rejected_{rejection.code}"] += 1
            self._reject(rejection)
            return
        time.sleep(state.config.answer_seconds)
        if state.chance(faults.submit_drop_after, "submit"):
            state.stats["drops_after_charge"] += 1
            self._drop()
            return
        if state.chance(faults.submit_504_after, "submit"):
            state.stats["gateway_timeouts_after_charge"] += 1
            self._gateway(504)
            return
        if state.chance(faults.malformed_json, "submit"):
            self._send(200, b'{"task_id": "', "application/json")
            return
        self._json(200, _envelope(200, task_id=task.task_id))

    def _parse_submit(self, body: bytes) -> tuple[bytes, frozenset[str]]:
        content_type, options = multipart.parse_options_header(
            self.headers.get("Content-Type", ""))
        if content_type != "multipart/form-data" or "boundary" not in options:
            raise Rejection(400, apispec.ERROR_PARAMETERS,
                            "Content-Type must be multipart/form-data.")
        image: bytes | None = None
        enabled: set[str] = set()
        try:
            parser = multipart.MultipartParser(io.BytesIO(body), options["boundary"],
                                               content_length=len(body),
                                               memory_limit=64 * 1024 * 1024,
                                               partsize_limit=64 * 1024 * 1024)
            for part in parser:
                if part.name == "image" and part.filename is not None:
                    image = part.raw
                elif part.name in apispec.OPTION_NAMES:
                    if part.value not in ("0", "1"):
                        raise Rejection(400, apispec.INVALID_PARAMETER,
                                        f"{part.name} must be 0 or 1.")
                    if part.value == "1":
                        enabled.add(part.name)
        except multipart.MultipartError as exc:
            raise Rejection(400, apispec.ERROR_PARAMETERS, f"Malformed form: {exc}") from exc
        if not image:
            raise Rejection(400, apispec.MISSING_PARAMETERS, "image is required.")
        return image, frozenset(enabled)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        state, faults = self.state, self.state.config.faults
        if parts.path == apispec.CREDITS_PATH:
            state.stats["credit_queries"] += 1
            if state.stats["credit_queries"] <= faults.credits_refused:
                self._reject(Rejection(429, apispec.RATE_LIMITED, "Request too frequent."),
                             {"Retry-After": "1"})
                return
            if not self._common():
                return
            if state.chance(faults.credits_5xx, "credits"):
                state.stats["faults_5xx"] += 1
                self._gateway(502)
                return
            with state.lock:
                credits = state.credits
            self._json(200, _envelope(200, data={"credits": credits}))
            return
        if parts.path != apispec.QUERY_PATH:
            self._reject(Rejection(404, apispec.AI_NOT_EXISTS, "No such API."))
            return
        state.stats["queries"] += 1
        state.timeline.append((time.time(), "query"))
        if not self._common():
            return
        if state.chance(faults.query_5xx, "query"):
            state.stats["faults_5xx"] += 1
            self._gateway(503)
            return
        if state.chance(faults.query_drop, "query"):
            self._drop()
            return
        task_id = (parse_qs(parts.query).get("task_id") or [""])[0]
        with state.lock:
            task = state.tasks.get(task_id)
            state.queries_per_task[task_id] += 1
        if task is None and state.config.unknown_tasks_queued:
            self._json(200, _envelope(200, task_status=apispec.TASK_QUEUED, data={}))
            return
        if task is None or state.expired(task):
            self._reject(Rejection(404, "ERROR_TASK_NOT_EXISTS", "Task not found or expired."))
            return
        if state.chance(faults.malformed_json, "query"):
            self._send(200, b"<html>oops", "application/json")
            return
        self._answer_task(task)

    def _answer_task(self, task: Task) -> None:
        status = self.state.task_status(task)
        if status == apispec.TASK_COMPLETED and task.outcome == "failed":
            self._reject(Rejection(422, apispec.PROCESSING_FAILURE, "Image processing failed."))
            return
        if status == apispec.TASK_COMPLETED and task.outcome == "unknown":
            self._json(200, _envelope(200, task_status=7, data={}))
            return
        data: dict[str, Any] = {}
        if status == apispec.TASK_COMPLETED:
            self.state.result_of(task)
            ext = {"PNG": "png", "WEBP": "webp"}.get(task.fmt, "jpg")
            data["result_urls"] = [f"{self.server.emulator.result_base}/results/{task.token}.{ext}"]
        self._json(200, _envelope(200, task_status=status, data=data))


class ResultHandler(_Handler):
    def do_GET(self) -> None:
        state, faults = self.state, self.state.config.faults
        with state.lock:
            state.result_host_headers.append({k.lower(): v for k, v in self.headers.items()})
            state.timeline.append((time.time(), "download"))
            state.stats["downloads"] += 1
        if self.headers.get(apispec.KEY_HEADER) is not None:
            state.stats["key_sent_to_result_host"] += 1
        redirect = self.server.emulator.result_redirect
        if redirect:
            self._send(302, b"", "text/plain", {"Location": redirect})
            return
        token = urlsplit(self.path).path.rsplit("/", 1)[-1].split(".", 1)[0]
        task = state.by_token.get(token)
        if task is None or state.expired(task):
            self._send(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired"
                            b"</Message></Error>", "application/xml")
            return
        if state.chance(faults.download_5xx, "download"):
            self._send(500, b"Internal Error", "text/plain")
            return
        body = state.result_of(task)
        if state.chance(faults.download_garbage, "download"):
            self._send(200, b"<html>not an image</html>" * 40, "image/jpeg")
            return
        if state.chance(faults.download_truncate, "download"):
            state.stats["truncated_downloads"] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self._drop()
            return
        self._send(200, body, "image/" + {"JPEG": "jpeg"}.get(task.fmt, task.fmt.lower()))


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler],
          emulator: Emulator, or_any: bool) -> _Server:
    """A server on ``port``; ``or_any``: on a free one if that is taken by now."""
    try:
        return _Server((host, port), handler, emulator)
    except OSError:
        if not port or not or_any:
            raise
        return _Server((host, 0), handler, emulator)


class Emulator:
    """Both servers on loopback, started in daemon threads. Use as a context manager."""

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1",
                 api_port: int = 0, result_port: int = 0) -> None:
        self.config = config or EmulatorConfig()
        self.state = EmulatorState(self.config)
        self.result_redirect: str | None = None
        folder = self.config.state_dir
        saved = folder / "ports.json" if folder is not None else None
        # Ports asked for are taken or refused; the ports of the emulator before it (the
        # result links in a ledger name them) are taken where they are still free.
        reused = saved is not None and saved.exists() and not (api_port or result_port)
        if reused and saved is not None:
            api_port, result_port = json.loads(saved.read_text())
        self._api = _bind(host, api_port, ApiHandler, self, or_any=reused)
        self._results = _bind(host, result_port, ResultHandler, self, or_any=reused)
        if saved is not None:
            saved.write_text(json.dumps([self.api_port, self.result_port]))
        self._threads: list[threading.Thread] = []

    @property
    def api_port(self) -> int:
        return int(self._api.server_address[1])

    @property
    def result_port(self) -> int:
        return int(self._results.server_address[1])

    @property
    def api_base(self) -> str:
        host, port = self._api.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def result_base(self) -> str:
        host, port = self._results.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def stats(self) -> dict[str, int]:
        with self.state.lock:
            return dict(self.state.stats)

    def set_credits(self, credits: float) -> None:
        with self.state.lock:
            self.state.credits = credits

    def start(self) -> Emulator:
        for server in (self._api, self._results):
            thread = threading.Thread(target=server.serve_forever, args=(POLL_SECONDS,),
                                      daemon=True, name=f"emulator-{server.server_address[1]}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._api, self._results):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
