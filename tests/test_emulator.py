"""The emulator answers as API.md describes, checked with a plain HTTP client."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
from PIL import Image

from batch import apispec
from batch.emulator import Emulator
from batch.emulator import retouch as retouch_module
from batch.emulator import state as state_module
from tests.conftest import API_KEY, MakeEmulator
from tests.imagegen import encode, portrait


def submit(emulator: Emulator, files: Mapping[str, Any] | None, data: dict[str, str] | None = None,
           key: str | None = API_KEY) -> httpx.Response:
    headers = {apispec.KEY_HEADER: key} if key else {}
    return httpx.post(emulator.api_base + apispec.SUBMIT_PATH, files=files, data=data,
                      headers=headers)


def code(response: httpx.Response) -> str:
    return str(response.json()["error_detail"]["code"])


def test_validation_and_error_bodies(emulator: Emulator) -> None:
    image = {"image": ("a.jpg", encode(portrait(), "JPEG"), "image/jpeg")}
    assert code(submit(emulator, image, key=None)) == apispec.APPLICATION_NOT_EXISTS
    assert submit(emulator, image, key="wrong").status_code == 401
    missing = submit(emulator, {"smart_skin": (None, "1")})
    assert (missing.status_code, code(missing)) == (400, apispec.MISSING_PARAMETERS)
    bad_option = submit(emulator, image, {"smart_skin": "yes"})
    assert (bad_option.status_code, code(bad_option)) == (400, apispec.INVALID_PARAMETER)
    gif = submit(emulator, {"image": ("a.gif", encode(portrait(), "GIF"), "image/gif")})
    assert gif.status_code == 400
    assert emulator.stats.get("charged", 0) == 0
    ok = submit(emulator, image, {"smart_skin": "1"})
    body = ok.json()
    assert ok.status_code == 200 and body["task_id"] and body["error_code"] == 0
    assert {"request_id", "log_id", "error_detail"} <= set(body)


def test_large_uploads_are_refused_as_the_api_does(emulator: Emulator) -> None:
    """The server decodes a large JPEG at a reduced size, yet still refuses one cut short,
    one of 4096 pixels or more, and one without a face; a whole one within limits passes."""
    photo = encode(portrait(4000, 3000, seed=2, grain=20), "JPEG", quality=90)
    cases = {
        "cut short": (photo[:len(photo) * 2 // 3], 400, apispec.ERROR_PARAMETERS),
        "too large": (encode(portrait(4096, 600, seed=2), "JPEG"), 400, apispec.ERROR_PARAMETERS),
        "no face": (encode(Image.new("RGB", (4000, 3000), (40, 90, 200)), "JPEG"), 422,
                    apispec.NO_FACE_IN_FILE),
    }
    for name, (data, status, error) in cases.items():
        answer = submit(emulator, {"image": ("a.jpg", data, "image/jpeg")}, {"smart_skin": "1"})
        assert (answer.status_code, code(answer)) == (status, error), name
    assert emulator.stats.get("charged", 0) == 0
    ok = submit(emulator, {"image": ("a.jpg", photo, "image/jpeg")}, {"smart_skin": "1"})
    assert ok.status_code == 200 and emulator.stats["charged"] == 1


def test_tasks_move_through_states_and_results_live_on_another_host(
        make_emulator: MakeEmulator) -> None:
    """A task is queued, then processing, then completed with a result link on another host,
    which stops serving it (and the task is gone) once its life is over. Each step is made by
    moving the task's own times, not by waiting for them: a busy machine's pauses between
    queries decide nothing."""
    import time

    emulator = make_emulator(queue_seconds=600, process_seconds=600, result_ttl=3600)
    image = {"image": ("a.png", encode(portrait(), "PNG"), "image/png")}
    task_id = submit(emulator, image).json()["task_id"]
    task = emulator.state.tasks[task_id]
    query = emulator.api_base + apispec.QUERY_PATH
    headers = {apispec.KEY_HEADER: API_KEY}

    def status() -> int:
        return int(httpx.get(query, params={"task_id": task_id}, headers=headers)
                   .json()["task_status"])

    assert status() == 0
    task.queued_until = time.time()
    assert status() == 1
    task.ready_at = time.time()
    body = httpx.get(query, params={"task_id": task_id}, headers=headers).json()
    assert body["task_status"] == 2
    [url] = body["data"]["result_urls"]
    assert url.startswith(emulator.result_base) and emulator.result_base != emulator.api_base
    assert httpx.get(url).status_code == 200
    task.created -= 3600  # its life over
    assert httpx.get(url).status_code == 403
    gone = httpx.get(query, params={"task_id": task_id}, headers=headers)
    assert gone.status_code == 404


def test_credits_run_out(make_emulator: MakeEmulator) -> None:
    emulator = make_emulator(credits=1)
    image = {"image": ("a.jpg", encode(portrait(), "JPEG"), "image/jpeg")}
    assert submit(emulator, image).status_code == 200
    empty = submit(emulator, image)
    assert (empty.status_code, code(empty)) == (429, apispec.NOT_ENOUGH_CREDITS)
    credits = httpx.get(emulator.api_base + apispec.CREDITS_PATH,
                        headers={apispec.KEY_HEADER: API_KEY}).json()
    assert credits["data"]["credits"] == 0


def test_the_rate_limit_holds_in_every_second_however_threads_interleave(
        make_emulator: MakeEmulator) -> None:
    """The benchmarks and the pace tests judge the client by the emulator's own count of what
    it let through, so that count must never exceed the limit, however the server's request
    threads interleave (each request asks the limiter from a thread of its own)."""
    state = make_emulator(qps_limit=20).state
    stop = time.monotonic() + 2.5

    def ask() -> None:
        while time.monotonic() < stop:
            state.over_rate()

    # Threads switch far more often than by default, as on a loaded machine where a request's
    # thread may lose the processor at any instruction.
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switching)
    assert len(state.accepted) >= 40  # the limit was reached in each second
    assert state.busiest_second() <= 20


def test_making_one_result_holds_no_other_request_back(make_emulator: MakeEmulator,
                                                       monkeypatch: Any) -> None:
    """While a finished task's result is being made (the slowest thing the emulator does on a
    photo), other requests are answered: held back, they would reach the rate limit's window
    together afterwards and be refused as a burst the client never sent."""
    emulator = make_emulator(queue_seconds=0.0, process_seconds=0.0)
    making, release = threading.Event(), threading.Event()
    real = retouch_module.retouch

    def slow_retouch(*args: Any) -> bytes:
        making.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(state_module, "retouch", slow_retouch)
    image = {"image": ("a.jpg", encode(portrait(), "JPEG"), "image/jpeg")}
    task_id = submit(emulator, image, {"smart_skin": "1"}).json()["task_id"]
    headers = {apispec.KEY_HEADER: API_KEY}
    finished: list[httpx.Response] = []
    query = threading.Thread(target=lambda: finished.append(httpx.get(
        emulator.api_base + apispec.QUERY_PATH, params={"task_id": task_id}, headers=headers,
        timeout=60)))
    query.start()
    try:
        assert making.wait(30)
        credits = httpx.get(emulator.api_base + apispec.CREDITS_PATH, headers=headers,
                            timeout=10)
        assert credits.status_code == 200
        assert not finished  # the result is still being made
    finally:
        release.set()
        query.join(60)
    assert finished[0].json()["task_status"] == 2


def test_emulate_on_a_port_in_use_says_so_rather_than_serving_elsewhere() -> None:
    """`skinbatch emulate --port P` with P taken (an emulator left running) exits with the
    reason: serving on another port would leave clients pointed at P talking to whatever
    holds it."""
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        port, result_port = taken.getsockname()[1], free.getsockname()[1]
        free.close()
        result = subprocess.run(
            [sys.executable, "-m", "batch", "emulate", "--port", str(port), "--result-port",
             str(result_port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot serve on 127.0.0.1 port {port}" in result.stderr
    assert "another emulator running?" in result.stderr and "API at" not in result.stdout
