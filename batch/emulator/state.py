"""The emulator's account, tasks and fault decisions, independent of HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from batch import apispec
from batch.emulator.retouch import looks_like_a_portrait, retouch


@dataclass
class Faults:
    """Probabilities (0..1) of each misbehaviour, drawn per request from a seeded RNG."""

    submit_5xx: float = 0.0
    submit_drop_before: float = 0.0
    #: An upload's body stops arriving part-way (a link that fails): the server waits
    #: ``stall_seconds``, then resets the connection.
    submit_drop_midway: float = 0.0
    submit_drop_after: float = 0.0
    #: The task is made (and charged), and a gateway in front of the API, tired of waiting
    #: for it, answers 504 in its place.
    submit_504_after: float = 0.0
    query_5xx: float = 0.0
    query_drop: float = 0.0
    rate_limit: float = 0.0
    malformed_json: float = 0.0
    failed_task: float = 0.0
    unknown_status: float = 0.0
    download_truncate: float = 0.0
    download_5xx: float = 0.0
    download_garbage: float = 0.0
    stall: float = 0.0
    stall_seconds: float = 30.0
    #: "seconds", "date" or "" (no Retry-After header on 429s).
    retry_after: str = "seconds"
    #: The first this many balance queries are answered 429 (a key shared with another
    #: client that is busy, as the night's run starts).
    credits_refused: int = 0
    #: Balance queries answered 502 by the gateway (with ``submit_5xx``: the API down).
    credits_5xx: float = 0.0


@dataclass
class EmulatorConfig:
    api_keys: frozenset[str] = frozenset({apispec.EMULATOR_KEY})
    locked_keys: frozenset[str] = frozenset()
    credits: float = 1000.0
    cost: float = 1.0
    queue_seconds: float = 0.2
    process_seconds: float = 0.3
    #: Each task's times are scaled by a factor drawn uniformly from [1 - jitter, 1 + jitter].
    jitter: float = 0.0
    #: Added to every API answer (upload/round-trip latency).
    latency: float = 0.0
    #: How long an upload's answer takes once its task is made and charged (a slow way back):
    #: what happens to the client between the charge and the answer.
    answer_seconds: float = 0.0
    result_ttl: float = apispec.RESULT_TTL_SECONDS
    #: Requests per second the API host accepts before answering 429 (None: unlimited).
    qps_limit: float | None = None
    #: Bytes per second the API host reads of request bodies, across all connections (None:
    #: as fast as loopback goes): the studio's uplink, for benchmarks.
    upload_bandwidth: float | None = None
    require_face: bool = True
    #: Retouch results with Pillow (False: the result is the upload itself, so that a
    #: benchmark's server spends no CPU the client on the same machine would miss).
    retouch: bool = True
    #: Answer "queued" for task ids it never issued (memory benchmarks with pre-filled ledgers).
    unknown_tasks_queued: bool = False
    #: Keep every upload's raw request body (tests look for what left the client).
    record_uploads: bool = False
    #: Keep the account and its tasks in this folder, so that an emulator started again there
    #: still knows them (the bundled one keeps them beside the ledger: a resumed run finishes
    #: what it started instead of finding its tasks gone).
    state_dir: Path | None = None
    seed: int = 0
    faults: Faults = field(default_factory=Faults)


class Uplink:
    """One line shared by every upload: each chunk read occupies it for its size over the
    bandwidth, and a reader waits until the line has carried it (TCP's flow control then
    holds the client back, as a real line would)."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self._lock = threading.Lock()
        self._free_at = 0.0

    def carry(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + size / self.bandwidth
            done = self._free_at
        time.sleep(max(0.0, done - time.monotonic()))


@dataclass
class Task:
    task_id: str
    created: float
    ready_at: float
    queued_until: float
    enabled: frozenset[str]
    source: bytes
    fmt: str
    source_sha256: str = ""
    outcome: str = "ok"
    result: bytes | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))


class Rejection(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class EmulatorState:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.credits = config.credits
        self.tasks: dict[str, Task] = {}
        self.by_token: dict[str, Task] = {}
        self.stats: Counter[str] = Counter()
        self.queries_per_task: Counter[str] = Counter()
        #: (arrival time, "submit" | "query" | "download") of every request, for benchmarks.
        self.timeline: list[tuple[float, str]] = []
        self.result_host_headers: list[dict[str, str]] = []
        self.submitted_digests: list[str] = []
        self.uploads: list[bytes] = []
        self.lock = threading.RLock()
        #: One lock a task for making its result: making a photo's result is the slowest
        #: thing the emulator does, and under :attr:`lock` it would hold every other request
        #: (the rate limit's count included) back, to let them through in one burst after,
        #: which a real service does not.
        self._rendering: dict[str, threading.Lock] = {}
        self._rng = random.Random(config.seed)
        self._streams: dict[str, random.Random] = {}
        self._window: list[float] = []
        #: When each API request the rate limit let through arrived (time.monotonic()).
        self.accepted: list[float] = []
        #: When each API request arrived, refused or not: what the clients offered.
        self.arrived: list[float] = []
        self.uplink = Uplink(config.upload_bandwidth) if config.upload_bandwidth else None
        #: Each request body read through the uplink: (start, end, bytes), time.monotonic().
        self.upload_spans: list[tuple[float, float, int]] = []
        if config.state_dir is not None:
            self._load(config.state_dir)

    def _load(self, folder: Path) -> None:
        (folder / "sources").mkdir(parents=True, exist_ok=True)
        journal = folder / "tasks.jsonl"
        if not journal.exists():
            return
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            self.credits = record.pop("credits_left")
            record["enabled"] = frozenset(record["enabled"])
            task = Task(**record, source=b"")
            self.tasks[task.task_id] = task
            self.by_token[task.token] = task

    def _save(self, task: Task, data: bytes) -> None:
        """The task and its source, on disk before the answer goes out."""
        folder = self.config.state_dir
        if folder is None:
            return
        source = folder / "sources" / task.source_sha256
        if not source.exists():
            source.write_bytes(data)
        record = {k: v for k, v in asdict(task).items() if k not in ("source", "result")}
        record.update(enabled=sorted(task.enabled), credits_left=self.credits)
        with open(folder / "tasks.jsonl", "a") as journal:
            journal.write(json.dumps(record) + "\n")

    def chance(self, probability: float, kind: str) -> bool:
        """A fault's roll, from a random stream of its own for each kind of request (submit,
        query, download): a seed gives every kind the same faults in the same order, however
        the concurrent requests of the other kinds interleave with it."""
        if probability <= 0:
            return False
        with self.lock:
            stream = self._streams.get(kind)
            if stream is None:
                stream = self._streams[kind] = random.Random(f"{self.config.seed}:{kind}")
            return stream.random() < probability

    def key_problem(self, key: str | None) -> Rejection | None:
        if not key or (key not in self.config.api_keys and key not in self.config.locked_keys):
            return Rejection(401, apispec.APPLICATION_NOT_EXISTS, "Invalid API key.")
        if key in self.config.locked_keys:
            return Rejection(403, apispec.USER_LOCKED, "The account has been locked.")
        return None

    def over_rate(self, upload: bool = False) -> bool:
        """A sliding one-second window over all API requests. The moment is read under the
        lock: a thread preempted between reading it and taking the lock would otherwise be
        judged against a window another thread had already moved past it."""
        limit = self.config.qps_limit
        with self.lock:
            now = time.monotonic()
            self.arrived.append(now)
            self._window = [t for t in self._window if now - t < 1.0]
            if limit is not None and len(self._window) >= limit:
                self.stats["rate_limited"] += 1
                self.stats["rate_limited_uploads"] += upload
                return True
            self._window.append(now)
            self.accepted.append(now)
            return False

    def busiest_second(self, offered: bool = False) -> int:
        """The most requests let through in any one second (``offered``: the most that
        arrived, those the rate limit refused included)."""
        with self.lock:
            times = sorted(self.arrived if offered else self.accepted)
        most, first = 0, 0
        for last, moment in enumerate(times):
            while moment - times[first] >= 1.0:
                first += 1
            most = max(most, last - first + 1)
        return most

    def validate_image(self, data: bytes) -> str:
        """The upload's format, or the refusal the API would answer. The whole file is
        decoded, a JPEG at an eighth of its size (not below the 64 pixels the face check
        looks at): its every byte is still read, so a damaged file fails as it would at full
        size, for a fraction of the CPU that a benchmark's client on the same cores would
        otherwise lose to the server."""
        if len(data) > apispec.MAX_UPLOAD_BYTES:
            raise Rejection(400, apispec.ERROR_PARAMETERS, "Image size exceeds 10 MB.")
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            image.draft(None, (max(64, width // 8), max(64, height // 8)))
            image.load()
        except Exception as exc:
            raise Rejection(400, apispec.ERROR_PARAMETERS,
                            "The image could not be decoded.") from exc
        fmt = image.format or ""
        if fmt not in apispec.ACCEPTED_FORMATS:
            raise Rejection(400, apispec.ERROR_PARAMETERS, f"Unsupported image format {fmt}.")
        if max(width, height) >= apispec.MAX_SIDE_EXCLUSIVE:
            raise Rejection(400, apispec.ERROR_PARAMETERS,
                            "Image resolution must be less than 4096x4096px.")
        if self.config.require_face and not looks_like_a_portrait(image):
            raise Rejection(422, apispec.NO_FACE_IN_FILE, "No face detected in the image.")
        return fmt

    def create_task(self, data: bytes, fmt: str, enabled: frozenset[str]) -> Task:
        """Charge the account and queue a task. Raises when credits are short."""
        with self.lock:
            if self.credits < self.config.cost:
                raise Rejection(429, apispec.NOT_ENOUGH_CREDITS, "Insufficient credits.")
            self.credits -= self.config.cost
            self.stats["charged"] += 1
            digest = hashlib.sha256(data).hexdigest()
            self.submitted_digests.append(digest)
            scale = 1.0 + self._rng.uniform(-self.config.jitter, self.config.jitter)
            now = time.time()
            queued = self.config.queue_seconds * scale
            task = Task(
                task_id=secrets.token_hex(16),
                created=now,
                queued_until=now + queued,
                ready_at=now + queued + self.config.process_seconds * scale,
                enabled=enabled,
                source=data,
                fmt=fmt,
                source_sha256=digest,
            )
            faults = self.config.faults
            roll = self._rng.random()
            if roll < faults.failed_task:
                task.outcome = "failed"
            elif roll < faults.failed_task + faults.unknown_status:
                task.outcome = "unknown"
            self.tasks[task.task_id] = task
            self.by_token[task.token] = task
            self._save(task, data)
            return task

    def task_status(self, task: Task) -> int:
        now = time.time()
        if now < task.queued_until:
            return apispec.TASK_QUEUED
        if now < task.ready_at:
            return apispec.TASK_PROCESSING
        return apispec.TASK_COMPLETED

    def result_of(self, task: Task) -> bytes:
        with self.lock:
            rendering = self._rendering.setdefault(task.task_id, threading.Lock())
        with rendering:
            if task.result is None:
                if not task.source and self.config.state_dir is not None:
                    task.source = (self.config.state_dir / "sources" /
                                   task.source_sha256).read_bytes()
                task.result = retouch(Image.open(io.BytesIO(task.source)), task.enabled,
                                      task.fmt) if self.config.retouch else task.source
                task.source = b""
            return task.result

    def expired(self, task: Task) -> bool:
        return time.time() > task.created + self.config.result_ttl
