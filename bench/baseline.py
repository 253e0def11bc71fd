"""The baseline: a sequential submit-poll-download loop, as most public client code does it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from batch import apispec


def sequential_client(api_base: str, key: str, images: list[Path], out: Path,
                      poll_interval: float) -> float:
    """Process ``images`` one after another; returns the seconds it took."""
    out.mkdir(parents=True, exist_ok=True)
    headers = {apispec.KEY_HEADER: key}
    started = time.perf_counter()
    with httpx.Client(base_url=api_base, headers=headers, timeout=60) as api, \
            httpx.Client(timeout=60) as results:
        for image in images:
            answer = api.post(apispec.SUBMIT_PATH,
                              files={"image": (image.name, image.read_bytes(), "image/jpeg")},
                              data={"smart_skin": "1"}).json()
            task_id = answer["task_id"]
            while True:
                time.sleep(poll_interval)
                status = api.get(apispec.QUERY_PATH, params={"task_id": task_id}).json()
                if status["task_status"] == apispec.TASK_COMPLETED:
                    break
            url = status["data"]["result_urls"][0]
            (out / image.name).write_bytes(results.get(url).content)
    return time.perf_counter() - started
