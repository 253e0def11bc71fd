"""What the result host sends is never trusted: scheme, size and content are checked."""

from __future__ import annotations

import json
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from batch.emulator import Emulator, Faults
from batch.states import JobState
from tests.checks import assert_outputs_right, ledger_of
from tests.conftest import FAST_FLAGS, MakeEmulator, fast_config, loopback_server, run_cli
from tests.imagegen import write_portrait


def run_one(tmp_path: Path, emulator: Emulator, extra_config: str = "") -> tuple[int, str]:
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg")
    config = tmp_path / "c.toml"
    config.write_text("backoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 3\n" + extra_config)
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS],
                     emulator)
    ledger = ledger_of(out)
    problems = ledger.problems()
    ledger.close()
    assert len(problems) <= 1, problems
    assert not any(p.is_file() for p in out.glob("*.jpg")), "nothing may be written"
    return result.returncode, problems[0].reason if problems else ""


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/result.jpg",
                                    "gopher://127.0.0.1:70/1"])
def test_redirects_to_non_http_urls_are_refused(tmp_path: Path, emulator: Emulator,
                                                target: str) -> None:
    emulator.result_redirect = target
    code, reason = run_one(tmp_path, emulator)
    assert code == 1
    assert "not http(s)" in reason


def test_results_over_the_size_cap_are_cut_off(tmp_path: Path, emulator: Emulator) -> None:
    code, reason = run_one(tmp_path, emulator, "max_result_bytes = 2000\n")
    assert code == 1
    assert "cap" in reason


def test_a_paid_result_that_failed_is_fetched_again_by_retry_not_paid_again(
        tmp_path: Path, emulator: Emulator) -> None:
    """A photo failed for its download (a result over the cap) is paid for, and its link
    lives for hours: status says so, and ``retry --failed`` has the next run download it
    again, free, instead of sending the photo and paying for it twice."""
    code, _ = run_one(tmp_path, emulator, "max_result_bytes = 2000\n")
    assert code == 1 and emulator.stats["charged"] == 1
    out = tmp_path / "out"
    status = run_cli(["status", "--out", str(out)], None)
    assert "paid for: skinbatch retry --failed downloads it again, not paying again, " \
           "until its link expires" in status.stdout, status.stdout
    report = tmp_path / "report.json"
    assert run_cli(["report", "--out", str(out), "-o", str(report)], None).returncode == 0
    [attention] = json.loads(report.read_text())["needs_attention"]
    assert attention["why"].startswith("its download failed; paid for: skinbatch retry "
                                       "--failed downloads it again")
    (tmp_path / "c.toml").write_text("backoff_base = 0.01\nmax_attempts = 3\n")  # cap lifted
    retry = run_cli(["retry", "--out", str(out), "--failed"], None)
    assert retry.returncode == 0, retry.stderr
    assert "1 job(s) put back in line (1 of them paid for: downloaded again, not paid " \
           "again)" in retry.stdout
    again = run_cli(["run", str(tmp_path / "src"), "--out", str(out), "--config",
                     str(tmp_path / "c.toml"), *FAST_FLAGS], emulator)
    assert again.returncode == 0, again.stderr
    assert emulator.stats["charged"] == 1 and emulator.stats["submits"] == 1
    assert_outputs_right(out, {"a.jpg": (tmp_path / "src" / "a.jpg").read_bytes()}, emulator)


def test_content_that_is_not_an_image_is_never_accepted(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    """Every result arriving as something else (a captive portal's page, a proxy's error)
    is never saved; nor is the paid result given up: the run stops with it kept."""
    emulator = make_emulator(faults=Faults(download_garbage=1.0))
    src, out = tmp_path / "src", tmp_path / "out"
    write_portrait(src / "a.jpg")
    config = tmp_path / "c.toml"
    config.write_text("backoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 3\n")
    result = run_cli(["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS],
                     emulator)
    assert result.returncode == 1
    assert "not a valid image" in result.stderr and "kept" in result.stderr
    assert emulator.stats["downloads"] == 3
    assert not any(p.is_file() for p in out.glob("*.jpg")), "nothing may be written"
    ledger = ledger_of(out)
    assert [job.state for job in ledger.jobs_in(list(JobState))] == ["ready"]
    ledger.close()


class _Relayed(Emulator):
    """Result links that point at a relay in front of the result host."""

    relay = ""

    @property
    def result_base(self) -> str:
        return self.relay or super().result_base


def relay_spoiling_one(origin: str, every_time: bool = True
                       ) -> tuple[type[BaseHTTPRequestHandler], list[str]]:
    """A relay to ``origin`` that answers the first link asked for with a page instead of
    the image, every time (or only the first time), and slowly after the first; the others
    come through a moment later, so they are saved while that one is still being tried."""
    spoiled: list[str] = []

    class Relay(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            token = self.path.rsplit("/", 1)[-1]
            first = not spoiled
            if first:
                spoiled.append(token)
            if first or (every_time and token in spoiled):
                time.sleep(0.0 if first else 1.0)
                body = b"<html>not the image</html>" * 20
            else:
                time.sleep(0.3)
                with urllib.request.urlopen(origin + self.path) as answer:
                    body = answer.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Relay, spoiled


def test_one_result_that_never_comes_right_fails_alone(tmp_path: Path) -> None:
    """A result that keeps arriving wrong while the others are saved is that result's own
    problem: it fails with the reason, and the run goes on with the rest."""
    emulator = _Relayed(fast_config())
    with emulator:
        relay, spoiled = relay_spoiling_one(emulator.result_base)
        with loopback_server(relay) as emulator.relay:
            src, out = tmp_path / "src", tmp_path / "out"
            sources = {f"{i}.jpg": write_portrait(src / f"{i}.jpg", seed=i) for i in range(4)}
            config = tmp_path / "c.toml"
            config.write_text("backoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 3\n")
            result = run_cli(["run", str(src), "--out", str(out), "--config", str(config),
                              *FAST_FLAGS, "--smart-skin"], emulator)
        assert result.returncode == 1, result.stderr
        ledger = ledger_of(out)
        [problem] = ledger.problems()
        ledger.close()
        assert problem.state == "failed"
        assert "gave up after 3 attempts" in problem.reason
        assert "not a valid image" in problem.reason
        bad = Path(problem.path).name
        assert not (out / bad).exists()
        assert_outputs_right(out, {k: v for k, v in sources.items() if k != bad}, emulator)
        assert emulator.stats["charged"] == 4 and len(spoiled) == 1


def test_a_result_kept_by_the_last_run_survives_a_hitch_in_this_one(tmp_path: Path) -> None:
    """The attempt limit counts this run's tries: a result the last run kept after its
    limit is tried afresh, so one broken answer now does not stop this run too."""
    emulator = _Relayed(fast_config(faults=Faults(download_garbage=1.0)))
    with emulator:
        relay, spoiled = relay_spoiling_one(emulator.result_base, every_time=False)
        with loopback_server(relay) as emulator.relay:
            src, out = tmp_path / "src", tmp_path / "out"
            sources = {"a.jpg": write_portrait(src / "a.jpg")}
            config = tmp_path / "c.toml"
            config.write_text("backoff_base = 0.01\nbackoff_cap = 0.05\nmax_attempts = 3\n")
            args = ["run", str(src), "--out", str(out), "--config", str(config), *FAST_FLAGS]
            assert run_cli(args, emulator).returncode == 1  # kept, as ready, after 3 tries
            emulator.config.faults.download_garbage = 0.0
            spoiled.clear()  # the next answer is broken once more
            again = run_cli(args, emulator)
        assert again.returncode == 0, again.stderr
        assert len(spoiled) == 1 and emulator.stats["charged"] == 1
        assert_outputs_right(out, sources, emulator)
