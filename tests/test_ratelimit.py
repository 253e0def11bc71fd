"""Finding the pace the API takes, by its behaviour against the emulator: quiet raises the pace,
a 429 lowers it under the limit, a ceiling holds, and what was learned is where the next run
starts. Nothing here asserts how long anything took."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from batch.api import ratelimit
from batch.emulator import Emulator
from batch.ledger import open_ledger
from tests.checks import assert_no_double_pay, assert_outputs_right
from tests.conftest import MakeEmulator, popen_cli, run_cli, stopped, wait_for
from tests.imagegen import write_portrait

#: FAST_FLAGS without a ceiling: the default is to find the pace.
FLAGS = ["--poll-interval", "0.05", "--no-progress", "--concurrency", "8"]


def photos(src: Path, n: int, first: int = 0) -> dict[str, bytes]:
    return {f"{i:03d}.jpg": write_portrait(src / f"{i:03d}.jpg", seed=i)
            for i in range(first, first + n)}


def learned(out: Path) -> tuple[float, bool]:
    """The pace the ledger keeps for the next run, and whether a 429 bounded it."""
    ledger = open_ledger(out / ".skinbatch" / "ledger.sqlite")
    try:
        pace = json.loads(ledger.get_meta("api_pace") or "{}")
    finally:
        ledger.close()
    return float(pace["rate"]), bool(pace["limited"])


def test_without_a_limit_the_pace_grows_past_where_it_starts(tmp_path: Path,
                                                             emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sources = photos(src, 60)
    result = run_cli(["run", str(src), "--out", str(out), *FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert_outputs_right(out, sources, emulator)
    assert emulator.state.busiest_second() > 2 * ratelimit.START
    rate, limited = learned(out)
    assert not limited and rate > 2 * ratelimit.START
    assert emulator.stats.get("rate_limited", 0) == 0


def test_a_limit_nobody_told_us_is_found_kept_under_and_remembered(
        tmp_path: Path, make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(qps_limit=12.0)
    src, out = tmp_path / "src", tmp_path / "out"
    sources = photos(src, 80)
    result = run_cli(["run", str(src), "--out", str(out), *FLAGS], emulator)
    assert result.returncode == 0, result.stderr
    assert_outputs_right(out, sources, emulator)
    assert_no_double_pay(out, emulator, len(sources))
    refused = emulator.stats.get("rate_limited", 0)
    assert refused >= 1, "the limit is found by running into it"
    assert "pacing at" in result.stderr
    rate, limited = learned(out)
    assert limited and 12 * 0.5 <= rate <= 12 * 1.2

    more = photos(src, 20, first=80)
    again = run_cli(["run", str(src), "--out", str(out), *FLAGS], emulator)
    assert again.returncode == 0, again.stderr
    assert_outputs_right(out, {**sources, **more}, emulator)
    assert f"starting at {rate:.1f} requests a second" in again.stderr


def test_a_run_that_never_grew_the_pace_says_nothing_learned(tmp_path: Path,
                                                              emulator: Emulator) -> None:
    """The README's first command: one photo, the provider's poll interval. The pace never
    needs to leave where it starts, so the runs after it do not claim to start where the last
    one learned to."""
    src, out = tmp_path / "src", tmp_path / "out"
    for new_photo in (0, None, 1):  # a first run, a rerun with nothing new, one more photo
        if new_photo is not None:
            photos(src, 1, first=new_photo)
        result = run_cli(["run", str(src), "--out", str(out), "--no-progress", "--smart-skin"],
                         emulator)
        assert result.returncode == 0, result.stderr
        assert "API pace" not in result.stderr
    assert emulator.stats.get("charged", 0) == 2


def test_a_ceiling_holds_and_caps_what_is_learned(tmp_path: Path, emulator: Emulator) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sources = photos(src, 30)
    result = run_cli(["run", str(src), "--out", str(out), *FLAGS, "--max-qps", "6"], emulator)
    assert result.returncode == 0, result.stderr
    assert_outputs_right(out, sources, emulator)
    # Each request books a moment 1/6 s after the last one's. It reaches the server's count a
    # little after its moment, the later the busier the machine, so a few may bunch in one
    # second; over the run, the pace is the ceiling's.
    accepted = sorted(emulator.state.accepted)
    assert (len(accepted) - 1) / (accepted[-1] - accepted[0]) <= 6 * 1.1
    assert emulator.state.busiest_second() <= 12
    assert learned(out)[0] <= 6


def test_a_ceiling_for_one_run_is_not_learned_as_the_servers_limit(
        tmp_path: Path, emulator: Emulator) -> None:
    """A run under --max-qps 0.5 (a line kept free by day), stopped after its first upload:
    the next run, without the ceiling, grows from there as from a pace that passes, not as
    from a limit the server showed; and a ceiling under what was learned leaves it kept."""
    src, out = tmp_path / "src", tmp_path / "out"
    sources = photos(src, 6)
    slow = popen_cli(["run", str(src), "--out", str(out), *FLAGS, "--max-qps", "0.5"],
                     emulator)
    assert wait_for(lambda: emulator.stats.get("submits", 0) >= 1)
    stopped(slow)
    assert learned(out) == (0.5, False)
    free = run_cli(["run", str(src), "--out", str(out), *FLAGS], emulator)
    assert free.returncode == 0, free.stderr
    # Slower than the pace a run starts at with nothing known: nothing to tell.
    assert "API pace: starting" not in free.stderr, free.stderr
    assert_outputs_right(out, sources, emulator)
    grown = learned(out)
    assert grown[0] > 2 and grown[1] is False, grown
    more = photos(src, 2, first=6)
    capped = run_cli(["run", str(src), "--out", str(out), *FLAGS, "--max-qps", "2"], emulator)
    assert capped.returncode == 0, capped.stderr
    assert (f"starting at 2.0 requests a second (--max-qps); the last run learned "
            f"{grown[0]:.1f}, kept for a run without it.") in capped.stderr
    assert learned(out) == grown
    assert_outputs_right(out, {**sources, **more}, emulator)


def test_an_out_of_credits_429_is_not_taken_for_a_rate_limit(tmp_path: Path,
                                                             make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(credits=3)
    src, out = tmp_path / "src", tmp_path / "out"
    photos(src, 8)
    result = run_cli(["run", str(src), "--out", str(out), *FLAGS], emulator)
    assert result.returncode == 3, result.stderr
    assert "pacing at" not in result.stderr
    assert learned(out)[1] is False


def _refused_while_one_waits(limiter: ratelimit.RateLimiter, granted: int) -> float:
    """``granted`` requests through ``limiter``, then a 429 while another waits for the pace
    (the pace, not the work, is the bound): the pace after it."""

    async def scenario() -> float:
        for _ in range(granted):
            await limiter.acquire()
        waiting = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        limiter.rate_limited(None)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return limiter.rate

    return asyncio.run(scenario())


def test_the_first_429_ends_the_slow_start_at_what_the_server_took() -> None:
    """Nothing is known yet and the pace has been doubling: the first 429 shows the limit
    (three taken, the fourth refused), not a stray to be ignored until more follow."""
    rate = _refused_while_one_waits(ratelimit.RateLimiter(), 4)
    assert rate == pytest.approx(3 * ratelimit.HEADROOM)


def test_a_429_at_a_pace_that_has_been_passing_steps_just_under_it() -> None:
    """A known pace that touches the limit goes a step under it, not down to the count of the
    last second (which says less than the pace that has been passing: 15 of 20 here)."""
    limiter = ratelimit.RateLimiter(learned=ratelimit.Learned(20.0, True))
    rate = _refused_while_one_waits(limiter, 16)
    assert rate == pytest.approx(20.0 * ratelimit.HEADROOM)


def test_with_no_limit_known_the_balance_and_the_first_upload_go_together() -> None:
    """The run's first two requests need not wait a turn of the pace for each other; where a
    limit is known (or a ceiling given) the second waits its turn as every later one does.
    (A turn of the pace here is more than 0.8 s: the bounds below leave room for a busy
    machine.)"""

    async def two_requests(limiter: ratelimit.RateLimiter) -> float:
        started = time.monotonic()
        await limiter.acquire()
        await limiter.acquire()
        return time.monotonic() - started

    unknown = ratelimit.RateLimiter(learned=ratelimit.Learned(1.2, False))
    known = ratelimit.RateLimiter(learned=ratelimit.Learned(1.2, True))
    assert asyncio.run(two_requests(unknown)) < 0.5
    assert asyncio.run(two_requests(known)) >= 0.7


def _storm_after(limiter: ratelimit.RateLimiter, granted: int,
                 apart: float = 0.0) -> tuple[float, float]:
    """``granted`` requests through ``limiter``, ``apart`` seconds from each other, then
    :data:`ratelimit.STORM` 429s at once, the last while another request waits: the pace
    before and after them."""

    async def scenario() -> tuple[float, float]:
        for _ in range(granted):
            await limiter.acquire()
            await asyncio.sleep(apart)
        for _ in range(ratelimit.STORM - 1):
            limiter.rate_limited(None)
        waiting = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
        for _ in range(3):
            await asyncio.sleep(0)
        assert limiter.saturated
        before = limiter.rate
        limiter.rate_limited(None)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        return before, limiter.rate

    return asyncio.run(scenario())


def test_a_stall_that_bunches_requests_halves_the_pace_at_most() -> None:
    """A stall (the server's, the network's) lets requests sent over two seconds reach the
    server's one-second window together; it refuses the rest of that second, so the client's
    count says nothing got through (three sent, three refused). Cut to that count, the pace
    fell to its floor of one request in five seconds and a night's uploads crawled for many
    minutes; it is halved, and a limit that really fell is cut again a second later."""
    known = ratelimit.RateLimiter(learned=ratelimit.Learned(3.0, True))
    before, after = _storm_after(known, 3, apart=0.34)  # at the pace, none waiting for it
    assert after >= before / 2
    # In the slow start (nothing known yet), whose last doubling was hardly tried: a quarter.
    before, after = _storm_after(ratelimit.RateLimiter(), 3)
    assert after >= before / 4 > ratelimit.FLOOR
