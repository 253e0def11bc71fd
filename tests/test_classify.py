"""API.md's table of answers, one row per case."""

import random

import pytest

from batch.api.errors import ErrorKind, classify
from batch.api.retry import backoff_delay, parse_retry_after


def body(code: str = "", error_code: int | None = None) -> dict[str, object]:
    b: dict[str, object] = {"request_id": "r", "log_id": "l",
                            "error_detail": {"code": code, "message": "m"}}
    if error_code is not None:
        b["error_code"] = error_code
    return b


@pytest.mark.parametrize(("status", "payload", "endpoint", "kind"), [
    (200, body("", 0), "submit", None),
    (200, body("ERROR_PARAMETERS", 400), "submit", ErrorKind.PERMANENT),
    (400, body("ERROR_PARAMETERS"), "submit", ErrorKind.PERMANENT),
    (400, body("PROCESSING_FAILURE"), "query", ErrorKind.PERMANENT),
    (401, body("ERROR_APPLICATIONS_NOT_EXISTS"), "submit", ErrorKind.ACCOUNT),
    (401, None, "query", ErrorKind.ACCOUNT),
    (403, body("ERROR_USER_LOCKED"), "submit", ErrorKind.ACCOUNT),
    (404, body("ERROR_AI_NOT_EXISTS"), "submit", ErrorKind.ACCOUNT),
    (404, None, "submit", ErrorKind.ACCOUNT),
    (404, body("ERROR_TASK_NOT_EXISTS"), "query", ErrorKind.EXPIRED),
    (404, None, "query", ErrorKind.EXPIRED),
    (404, body("ERROR_AI_NOT_EXISTS"), "query", ErrorKind.ACCOUNT),
    (422, body("ERROR_NO_FACE_IN_FILE"), "submit", ErrorKind.PERMANENT),
    (429, body("ERROR_NOT_ENOUGH_CREDITS"), "submit", ErrorKind.ACCOUNT),
    (200, body("ERROR_NOT_ENOUGH_CREDITS"), "submit", ErrorKind.ACCOUNT),
    (429, body("ERROR_REQUEST_TOO_FREQUENT"), "submit", ErrorKind.RATE_LIMITED),
    (429, None, "query", ErrorKind.RATE_LIMITED),
    (502, None, "submit", ErrorKind.TRANSIENT),
    (503, None, "query", ErrorKind.TRANSIENT),
])
def test_classification(status: int, payload: dict[str, object] | None, endpoint: str,
                        kind: ErrorKind | None) -> None:
    error = classify(status, payload, endpoint)  # type: ignore[arg-type]
    assert (error.kind if error else None) == kind


def test_out_of_credits_is_not_a_rate_limit() -> None:
    error = classify(429, body("ERROR_NOT_ENOUGH_CREDITS"), "submit")
    assert error is not None and error.out_of_credits and error.kind is ErrorKind.ACCOUNT


def test_full_jitter_backoff_is_pinned_by_the_seed_and_capped() -> None:
    rng = random.Random(7)
    delays = [round(backoff_delay(a, base=1.0, cap=30.0, rng=rng), 4) for a in range(8)]
    assert delays == [0.3238, 0.3017, 2.6037, 0.5795, 8.5741, 10.9707, 1.74, 15.2231]
    rng = random.Random(1)
    assert all(0 <= backoff_delay(a, cap=30.0, rng=rng) <= 30.0 for a in range(50))


def test_retry_after_in_both_forms() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("999999") == 3600.0


def test_the_task_clock_learns_when_to_poll_first() -> None:
    from batch.stages.poller import TaskClock

    clock = TaskClock(minimum=5.0, warmup=3)
    assert clock.first_poll_after() == 5.0
    for seconds in (30.0, 32.0, 40.0, 31.0):
        clock.observe(seconds)
    assert clock.first_poll_after() == pytest.approx(40.0), "the 80th percentile"
    for _ in range(200):
        clock.observe(10.0)
    assert clock.first_poll_after() == pytest.approx(10.0), "it follows a faster provider"
    learning = TaskClock(minimum=5.0, warmup=3)
    learning.observe_unfinished(12.0)
    assert learning.first_poll_after() == 12.0, "not before tasks were seen still running"
    learning.observe_unfinished(600.0)
    assert learning.first_poll_after() == 20.0, "a stuck task delays first polls only so far"
    assert TaskClock(minimum=5.0).first_poll_after(busy=True) == 20.0, \
        "rate-bound and still learning: the first polls wait (uploads need the tokens)"
    assert clock.first_poll_after(busy=True) >= clock.first_poll_after()
    fast = TaskClock(minimum=5.0, warmup=1)
    fast.observe(2.0)
    assert fast.first_poll_after() == 5.0, "never sooner than the documented cadence"
