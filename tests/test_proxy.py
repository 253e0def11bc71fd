"""A studio behind an HTTP proxy: the environment's proxy settings are honoured, and the key
goes only where API requests go."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from batch import apispec
from batch.emulator import Emulator
from tests.checks import assert_outputs_right
from tests.conftest import API_KEY, FAST_FLAGS, loopback_server, run_cli
from tests.imagegen import write_portrait


class _Forwarder(BaseHTTPRequestHandler):
    """A plain forward proxy: takes absolute-URI requests, forwards them, records each."""

    seen: list[tuple[str, str, str | None]]

    def _forward(self) -> None:
        target = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("proxy-connection", "connection", "host")}
        self.seen.append((self.command, self.path, self.headers.get(apispec.KEY_HEADER)))
        upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=30)
        try:
            query = f"?{target.query}" if target.query else ""
            upstream.request(self.command, target.path + query, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[tuple[str, str, str | None]]]]:
    seen: list[tuple[str, str, str | None]] = []
    with loopback_server(type("Handler", (_Forwarder,), {"seen": seen})) as url:
        yield url, seen


def test_requests_go_through_the_proxy_the_environment_names(
        tmp_path: Path, emulator: Emulator,
        proxy: tuple[str, list[tuple[str, str, str | None]]]) -> None:
    proxy_url, seen = proxy
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(3)}
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator,
                     extra_env={"HTTP_PROXY": proxy_url, "http_proxy": proxy_url,
                                "NO_PROXY": "", "no_proxy": ""})
    assert result.returncode == 0, result.stderr
    assert_outputs_right(out, sources, emulator)
    submits = [s for s in seen if s[0] == "POST"]
    downloads = [s for s in seen if s[1].startswith(emulator.result_base)]
    assert len(submits) == emulator.stats["submits"] == 3
    assert len(downloads) == emulator.stats["downloads"] == 3
    assert {key for _, url, key in seen if url.startswith(emulator.api_base)} == {API_KEY}
    assert {key for _, _, key in downloads} == {None}


def test_no_proxy_sends_requests_straight_to_the_host(
        tmp_path: Path, emulator: Emulator,
        proxy: tuple[str, list[tuple[str, str, str | None]]]) -> None:
    proxy_url, seen = proxy
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {"a.jpg": write_portrait(src / "a.jpg")}
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator,
                     extra_env={"HTTP_PROXY": proxy_url, "http_proxy": proxy_url,
                                "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    assert result.returncode == 0, result.stderr
    assert_outputs_right(out, sources, emulator)
    assert seen == []
