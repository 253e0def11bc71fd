"""Every image ends right with the emulator misbehaving in several ways at once."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from batch.api.client import ApiClient, Timeouts
from batch.api.errors import ApiError, ErrorKind
from batch.emulator import Emulator, Faults
from batch.options import Options
from batch.secret import Secret
from batch.stages.runtime import UNPROVEN_UPLOADS
from batch.states import JobState
from tests.checks import assert_no_double_pay, assert_outputs_right, closed_port, ledger_of
from tests.conftest import (
    API_KEY,
    FAST_FLAGS,
    MakeEmulator,
    loopback_server,
    popen_cli,
    run_cli,
)
from tests.imagegen import encode, portrait, write_portrait

FAST_RETRIES = """
backoff_base = 0.02
backoff_cap = 0.3
max_attempts = 30
"""


def config_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "skinbatch.toml"
    path.write_text(FAST_RETRIES + extra)
    return path


@pytest.mark.parametrize("retry_after", ["seconds", "date", ""])
def test_5xx_resets_429s_and_truncated_downloads(tmp_path: Path, make_emulator: MakeEmulator,
                                                  retry_after: str) -> None:
    faults = Faults(submit_5xx=0.15, submit_drop_before=0.05, submit_drop_after=0.05,
                    query_5xx=0.15, query_drop=0.05, rate_limit=0.05, malformed_json=0.03,
                    download_truncate=0.2, download_5xx=0.1, retry_after=retry_after)
    emulator = make_emulator(faults=faults, seed=len(retry_after))
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i:02d}.png": write_portrait(src / f"{i:02d}.png", "PNG", seed=i)
               for i in range(30)}
    result = run_cli(["run", str(src), "--out", str(out), "--config",
                      str(config_file(tmp_path)), *FAST_FLAGS], emulator, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_outputs_right(out, sources, emulator)
    ambiguous = assert_no_double_pay(out, emulator, len(sources))
    stats = emulator.stats
    assert stats["faults_5xx"] > 0 and stats["truncated_downloads"] > 0
    assert stats["charged"] - len(sources) <= ambiguous


@pytest.mark.parametrize("policy", ["resubmit", "hold"])
def test_a_gateway_timeout_after_an_upload_is_a_possible_charge(
        tmp_path: Path, make_emulator: MakeEmulator, policy: str) -> None:
    """A gateway in front of the API that gives up waiting answers 504 while the API goes on
    and charges the upload. Retried as a plain 5xx, that second charge was in no ledger row;
    it is a lost answer: counted as a possible charge, and sent again or held as the policy
    says."""
    emulator = make_emulator(faults=Faults(submit_504_after=0.3), seed=5)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(12)}
    result = run_cli(["run", str(src), "--out", str(out), "--on-ambiguous", policy,
                      "--config", str(config_file(tmp_path)), *FAST_FLAGS], emulator)
    timeouts = emulator.stats["gateway_timeouts_after_charge"]
    assert timeouts > 0, "the seed should produce gateway timeouts"
    ambiguous = assert_no_double_pay(out, emulator, len(sources))
    assert ambiguous == timeouts
    if policy == "resubmit":
        assert result.returncode == 0, result.stderr
        assert_outputs_right(out, sources, emulator)
    else:
        assert result.returncode == 1, result.stderr
        assert emulator.stats["charged"] == len(sources)
        assert "may have been charged" in result.stderr


def test_failed_and_unknown_status_tasks_are_recorded_not_retried(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(faults=Faults(failed_task=0.3, unknown_status=0.2), seed=3)
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(12):
        write_portrait(src / f"{i:02d}.jpg", seed=i)
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert result.returncode == 1
    failed = [t for t in emulator.state.tasks.values() if t.outcome != "ok"]
    assert failed, "the seed should produce failing tasks"
    assert emulator.stats["charged"] == 12
    ledger = ledger_of(out)
    problems = ledger.problems()
    ledger.close()
    assert len(problems) == len(failed)
    codes = {p.error_code for p in problems}
    assert codes <= {"PROCESSING_FAILURE", "TASK_STATUS_7"}
    assert len(list(out.glob("*.jpg"))) == 12 - len(failed)


@pytest.mark.parametrize("policy", ["resubmit", "report"])
def test_results_left_past_their_life_are_noticed_before_download(
        tmp_path: Path, make_emulator: MakeEmulator, policy: str) -> None:
    emulator = make_emulator(result_ttl=1.5)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(3)}
    config = config_file(tmp_path, f'result_ttl = 1.5\nexpiry_margin = 0.3\n'
                                   f'on_expired = "{policy}"\n')
    args = ["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS]
    crashed = popen_cli(args, emulator, extra_env={"SKINBATCH_CRASH_AFTER": "ready:3"})
    crashed.communicate(timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    downloads_before = emulator.stats.get("downloads", 0)
    time.sleep(1.6)
    result = run_cli(args, emulator)
    ledger = ledger_of(out)
    expired_jobs = [j for j in ledger.jobs_in(list(JobState))
                    if "expired" in [h["to_state"] for h in ledger.history(j.id)]]
    ledger.close()
    assert len(expired_jobs) >= 1
    if policy == "resubmit":
        assert result.returncode == 0, result.stdout + result.stderr
        assert_outputs_right(out, sources, emulator)
        assert emulator.stats["charged"] == len(sources) + len(expired_jobs)
        assert_no_double_pay(out, emulator, len(sources))
    else:
        assert result.returncode == 1
        assert "expired" in result.stdout
        assert emulator.stats["charged"] == len(sources)
        assert emulator.stats.get("downloads", 0) == downloads_before, \
            "an expired link must be noticed before any download is tried"


def test_a_job_fails_with_the_last_reason_after_its_attempt_limit(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(faults=Faults(submit_5xx=1.0))
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg")
    config = config_file(tmp_path, "")
    config.write_text("backoff_base = 0.01\nbackoff_cap = 0.02\nmax_attempts = 3\n"
                      "breaker_threshold = 100\n")
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS],
                     emulator)
    assert result.returncode == 1
    assert emulator.stats["submits"] == 3
    ledger = ledger_of(out)
    [problem] = ledger.problems()
    ledger.close()
    assert problem.state == "failed" and problem.http_status == 502
    assert "gave up after 3 attempts" in problem.reason


def test_slow_answers_are_waited_for(tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(faults=Faults(stall=0.3, stall_seconds=0.8), seed=2)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(8)}
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS], emulator)
    assert result.returncode == 0
    assert emulator.stats["stalls"] > 0
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == len(sources)


def test_uploads_under_a_bandwidth_cap_survive_dropped_connections(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Under --max-upload-rate one body at a time has the line: an upload whose connection
    drops or that gets a 5xx gives the line back, and the others go on."""
    emulator = make_emulator(faults=Faults(submit_drop_before=0.3, submit_drop_after=0.1,
                                           submit_5xx=0.2), upload_bandwidth=1e9)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i, size=(600, 800), grain=30)
               for i in range(10)}
    result = run_cli(["run", str(src), "--out", str(out), "--max-upload-rate", "2M",
                      "--concurrency", "4", *FAST_FLAGS], emulator, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, len(sources))
    assert emulator.stats.get("submits", 0) > len(sources)  # the faults did happen


def test_a_429_costs_an_upload_no_attempt(tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Meeting the rate limit is how the pace is found: an upload refused with a 429 waits
    and goes again, without using up its attempts (here only one is allowed)."""
    emulator = make_emulator(qps_limit=15.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i:02d}.jpg": write_portrait(src / f"{i:02d}.jpg", seed=i) for i in range(40)}
    config = tmp_path / "skinbatch.toml"
    config.write_text("max_attempts = 1\n")
    flags = ["--poll-interval", "0.2", "--max-qps", "60", "--concurrency", "8", "--no-progress"]
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *flags],
                     emulator)
    assert result.returncode == 0, result.stdout + result.stderr
    assert emulator.stats["rate_limited_uploads"] > 0
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 40


@pytest.mark.parametrize("stall", [0.0, 5.0])
def test_an_upload_cut_part_way_is_not_taken_for_a_charge(make_emulator: MakeEmulator,
                                                          stall: float) -> None:
    """A link that fails while a photo's bytes are going out (reset at once, or after the
    body stopped for longer than the write timeout) leaves the API without the whole upload:
    it cannot have charged it. Taken for a lost answer, the upload was counted as maybe
    charged (against --max-credits, in the credits said), and held for a person under
    --on-ambiguous hold."""
    emulator = make_emulator(faults=Faults(submit_drop_midway=1.0, stall_seconds=stall))

    async def upload() -> ApiError:
        client = ApiClient(emulator.api_base, Secret(API_KEY), timeouts=Timeouts(write=1.0))
        try:
            # More than the sockets' buffers hold: the write itself sees the link fail.
            await client.submit(os.urandom(9_000_000), "a.jpg", "image/jpeg",
                                Options.from_mapping({"smart_skin": True}))
        except ApiError as error:
            return error
        finally:
            await client.aclose()
        raise AssertionError("the upload went through")

    error = asyncio.run(upload())
    assert error.kind is ErrorKind.NOT_SENT, error
    assert "not charged" in str(error)
    assert emulator.stats["drops_midway"] == 1 and emulator.stats.get("charged", 0) == 0


def test_a_slow_line_gets_a_large_upload_through(make_emulator: MakeEmulator) -> None:
    """The write timeout bounds a stall, not the whole upload: on a line slower than a photo
    a timeout (here 9.5 MB at 4 MB/s against 1 s), the photo still goes, a slice at a time.
    Sent in one write, the write timed out every time and the photo never went."""
    emulator = make_emulator(upload_bandwidth=4_000_000)
    photo = encode(portrait(800, 1000, seed=3, grain=20), "JPEG") + os.urandom(9_500_000)

    async def upload() -> str:
        client = ApiClient(emulator.api_base, Secret(API_KEY), timeouts=Timeouts(write=1.0))
        try:
            submitted = await client.submit(photo, "a.jpg", "image/jpeg",
                                            Options.from_mapping({"smart_skin": True}))
        finally:
            await client.aclose()
        return submitted.task_id

    assert asyncio.run(upload())
    assert emulator.stats["charged"] == 1


class _Refuse(BaseHTTPRequestHandler):
    """A result host, or a proxy or firewall in front of it, that refuses every link."""

    def do_GET(self) -> None:
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_host() -> Iterator[str]:
    with loopback_server(_Refuse) as url:
        yield f"{url}/result.jpg"


def held_results(out: Path) -> list[str]:
    ledger = ledger_of(out)
    try:
        return [job.state for job in ledger.jobs_in(list(JobState))]
    finally:
        ledger.close()


def three_quick_attempts(tmp_path: Path, count: int) -> tuple[dict[str, bytes], Path, list[str]]:
    """``count`` photos, and the arguments of a run that gives a download three quick tries."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(count)}
    config = tmp_path / "c.toml"
    config.write_text("backoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 3\n")
    return sources, out, ["run", str(src), "--out", str(out), "--config", str(config),
                          *FAST_FLAGS, "--smart-skin"]


def the_path_opens_again(emulator: Emulator, args: list[str], out: Path,
                         sources: dict[str, bytes], charged: int) -> None:
    """The path to the result host is open again: the same command saves every photo, and
    the account has paid ``charged`` in all."""
    emulator.result_redirect = None
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == charged


def test_links_refused_before_they_expire_are_kept_not_paid_again(
        tmp_path: Path, make_emulator: MakeEmulator, refusing_host: str) -> None:
    """A 403 for a link hours from its expiry says the path is blocked (a proxy, a
    firewall), not that the result is gone: paying again would buy another refused link,
    over and over. The run stops with the results kept; once the path is open again, the
    same command saves them without a new upload."""
    emulator = make_emulator(credits=30)
    emulator.result_redirect = refusing_host
    sources, out, args = three_quick_attempts(tmp_path, 3)
    refused = run_cli(args, emulator)
    assert refused.returncode == 1, refused.stderr
    assert "HTTP 403" in refused.stderr and "run the same command again" in refused.stderr
    assert emulator.stats["charged"] == 3, "a refused link is never paid for again"
    assert held_results(out) == ["ready"] * 3
    assert not list(out.glob("*.jpg"))
    the_path_opens_again(emulator, args, out, sources, charged=3)


def test_a_result_host_down_longer_than_the_retries_loses_no_paid_result(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A paid result is not given up while its link lives: when the host stays down past
    the attempt limit, the run stops with the result kept for the next run, which saves it
    without paying again (a failed job would have cost a second upload to get it back)."""
    emulator = make_emulator(faults=Faults(download_5xx=1.0))
    sources, out, args = three_quick_attempts(tmp_path, 2)
    down = run_cli(args, emulator)
    assert down.returncode == 1, down.stderr
    assert "HTTP 500" in down.stderr
    assert held_results(out) == ["ready"] * 2

    emulator.config.faults.download_5xx = 0.0
    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 2


def test_a_line_down_past_the_retries_is_waited_out_not_a_stop(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Results paid for, then the line goes down: neither the result host nor the API
    answers. That is not the path to the result host, which ends the run: the run tries the
    results on, and saves them once the line is back, paying for none again."""
    state = tmp_path / "emulator"  # the tasks outlive the emulator, as the API's do
    first = make_emulator(faults=Faults(download_5xx=1.0), state_dir=state)
    sources, out, args = three_quick_attempts(tmp_path, 2)
    assert run_cli(args, first).returncode == 1
    assert held_results(out) == ["ready"] * 2
    first.stop()  # the line goes down: nothing answers on either port
    waiting = popen_cli(args, first)
    time.sleep(4)  # three quick tries a result take well under a second
    assert waiting.poll() is None, "the run stopped instead of waiting for the line"
    back = make_emulator(state_dir=state)  # on the same ports, knowing the same tasks
    assert back.api_base == first.api_base
    _, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, stderr
    assert "Neither the result host nor the API answers" in stderr
    assert_outputs_right(out, sources, back)
    assert back.stats.get("submits", 0) == 0, "nothing is sent, nor paid, again"


def test_a_result_host_this_network_cannot_reach_costs_a_few_credits_not_the_batch(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """A firewall or DNS filter that lets the API through but not the host its results
    come from: before its first result is saved, a run pays for no more than a handful of
    photos, then stops naming that host. Once the path is open, the same command saves
    those and sends the rest, each paid for once."""
    emulator = make_emulator()
    emulator.result_redirect = f"http://127.0.0.1:{closed_port()}/result.jpg"
    sources, out, args = three_quick_attempts(tmp_path, 50)
    blocked = run_cli(args, emulator)
    assert blocked.returncode == 1, blocked.stderr
    assert "could not connect to the result host 127.0.0.1" in blocked.stderr
    charged = emulator.stats["charged"]
    assert 0 < charged <= UNPROVEN_UPLOADS
    held = held_results(out)  # the results kept, and the photos not sent
    assert held.count("pending") == 50 - charged and "failed" not in held
    # The morning's status says why: the results are at stake until their links end.
    status = run_cli(["status", "--out", str(out)], None).stdout
    kept = [line for line in status.splitlines() if "paid for and kept" in line]
    assert kept and all(
        "could not connect to the result host 127.0.0.1 (ConnectError: All connection attempts "
        "failed; a firewall or DNS filter that lets the API through may block it); paid for "
        "and kept: the same command saves it until its link expires" in line
        for line in kept), status  # also those a stop cut off mid-download
    assert status.count("not sent: results paid for cannot be fetched from the result "
                        "host") == 50 - charged, status
    the_path_opens_again(emulator, args, out, sources, charged=50)


def test_photos_whose_tasks_fail_make_way_for_the_rest_before_any_result(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Tasks that fail bring no result and cost no more: with none saved yet, the photos
    they held back are still sent, and the run ends with every one of them failed, not
    waiting for a result that will never come."""
    emulator = make_emulator(faults=Faults(failed_task=1.0))
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(UNPROVEN_UPLOADS + 10):
        write_portrait(src / f"{i:02d}.jpg", seed=i)
    result = run_cli(["run", str(src), "--out", str(out), *FAST_FLAGS, "--smart-skin"],
                     emulator, timeout=120)
    assert result.returncode == 1, result.stderr
    assert held_results(out) == ["failed"] * (UNPROVEN_UPLOADS + 10)
    assert emulator.stats["submits"] == UNPROVEN_UPLOADS + 10


def test_a_refused_download_of_a_deleted_output_stops_nothing(
        tmp_path: Path, make_emulator: MakeEmulator, refusing_host: str) -> None:
    """An output deleted after delivery is downloaded again while its link lives; refused,
    it is listed as expired, as a dead link is: nothing is at stake (it is never bought
    again unasked), so no upload waits for it and the run does not stop over it."""
    emulator = make_emulator()
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg", seed=1)
    args = ["run", str(src), "--out", str(out), *FAST_FLAGS, "--smart-skin"]
    assert run_cli(args, emulator).returncode == 0
    (out / "a.jpg").unlink()
    emulator.result_redirect = refusing_host
    again = run_cli(args, emulator)
    assert held_results(out) == ["expired"]
    assert "No more uploads" not in again.stderr and "could not be fetched" not in again.stderr
    assert "expired" in again.stdout and emulator.stats["charged"] == 1


def gateway_losing_tasks(api_base: str) -> type[BaseHTTPRequestHandler]:
    """A gateway in front of the API that passes uploads on and answers every status query
    with a 404 page of its own: to the client, every task it sent is lost at once."""
    origin = urlsplit(api_base)

    class Gateway(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _relay(self, method: str) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length) if length else None
            if "query-async-task-result" in self.path:
                self._answer(404, b"<html><body>404 Not Found</body></html>",
                             [("Content-Type", "text/html")])
                return
            upstream = http.client.HTTPConnection(origin.hostname or "", origin.port)
            try:
                upstream.request(method, self.path, body=body, headers={
                    k: v for k, v in self.headers.items() if k.lower() != "host"})
                answer = upstream.getresponse()
                self._answer(answer.status, answer.read(), answer.getheaders())
            finally:
                upstream.close()

        def do_GET(self) -> None:
            self._relay("GET")

        def do_POST(self) -> None:
            self._relay("POST")

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Gateway


def test_tasks_lost_as_soon_as_sent_stop_the_uploads(tmp_path: Path,
                                                     make_emulator: MakeEmulator) -> None:
    """Tasks the API forgets before anything answered for them (a gateway in front of it
    404s the status path) are each resubmitted and lost again, a credit a time, until the
    account is empty. The first such loss stops the uploads; the lost jobs keep their
    reason, and a later run against a working API sends them again, the ledger saying why."""
    emulator = make_emulator(credits=20)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(3)}
    args = ["run", str(src), "--out", str(out), *FAST_FLAGS, "--smart-skin"]
    with loopback_server(gateway_losing_tasks(emulator.api_base)) as gateway:
        lost = run_cli([*args, "--api-base", gateway], emulator)
    assert lost.returncode == 1, lost.stderr
    assert "No more uploads: the API lost tasks it had just accepted" in lost.stderr
    assert emulator.stats["charged"] == 3
    assert held_results(out) == ["expired"] * 3
    assert "no longer knows this task" in lost.stdout

    again = run_cli(args, emulator)
    assert again.returncode == 0, again.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.stats["charged"] == 6



def web_page(seen: list[str]) -> type[BaseHTTPRequestHandler]:
    """A web server where the API should be (a captive portal, or --api-base set to the
    provider's site, which answers a page to any path): 200 with a page, or under /moved a
    redirect. ``seen`` gets each request's method and path."""

    class WebPage(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            if length:
                self.rfile.read(length)
            seen.append(f"{self.command} {self.path}")
            if self.path.startswith("/moved"):
                self.send_response(301)
                self.send_header("Location", "https://www.example.com/login")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            page = b"<html><body>Welcome to Studio Wi-Fi: please log in.</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return WebPage


def test_an_address_that_is_not_the_api_stops_the_run_before_an_upload(tmp_path: Path) -> None:
    """A web page (200) or a redirect where the API should answer: each upload would be
    ambiguous (maybe charged, sent again) or failed for good. The balance read before the
    first upload stops the run (exit 3) with what to check; no upload is sent and every job
    still waits."""
    src = tmp_path / "src"
    for i in range(3):
        write_portrait(src / f"{i}.jpg", seed=i)
    seen: list[str] = []
    with loopback_server(web_page(seen)) as url:
        for name, base, words in (
                ("page", url, "answers with a web page"),
                ("moved", f"{url}/moved",
                 "answers with a redirect (to https://www.example.com/login)")):
            out = tmp_path / name
            result = run_cli(["run", str(src), "--out", str(out), "--smart-skin",
                              "--api-base", base, *FAST_FLAGS], None)
            assert result.returncode == 3, result.stderr
            assert words in result.stderr and "check --api-base" in result.stderr
            assert "AILAB_API_KEY" not in result.stderr
            assert held_results(out) == ["pending"] * 3
    assert not [r for r in seen if r.startswith("POST")], seen
    assert len(seen) == 2, seen  # one balance read each


def test_an_api_certificate_this_machine_does_not_trust_stops_the_run_before_an_upload(
        tmp_path: Path) -> None:
    """A proxy that inspects TLS signs with an authority this machine does not know: every
    request would fail the same way, and each photo would wait out the backoff for nothing.
    The balance read before the first upload stops the run (exit 3) saying what to set."""
    import ssl
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(key), "-out", str(cert), "-days", "1",
                           "-subj", "/CN=proxy.example"], capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl cannot make a certificate here")
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg")
    seen: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), web_page(seen))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_cli(["run", str(src), "--out", str(out), "--smart-skin", "--api-base",
                          f"https://127.0.0.1:{server.server_address[1]}", *FAST_FLAGS], None)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 3, result.stderr
    assert "the API's TLS certificate is not trusted here" in result.stderr
    assert "point SSL_CERT_FILE at its certificate bundle" in result.stderr
    assert "AILAB_API_KEY" not in result.stderr
    assert held_results(out) == ["pending"] and seen == []
