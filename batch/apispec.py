"""Facts about the remote API, shared by the client and the emulator.

This is the only module the emulator and the client have in common, so the emulator can never
silently agree with a client bug: everything else it knows it learns over HTTP.
"""

from __future__ import annotations

from typing import Final

DEFAULT_API_BASE: Final = "https://www.ailabapi.com"
SUBMIT_PATH: Final = "/api/portrait/effects/smart-skin-advanced"
QUERY_PATH: Final = "/api/common/query-async-task-result"
CREDITS_PATH: Final = "/api/common/query-credits"
KEY_HEADER: Final = "ailabapi-api-key"
#: The key skinbatch's emulator takes unless told another: the API issues no such key, so a
#: run with it is a run on the emulator, whose results are imitations (``--emulator``, or
#: ``skinbatch emulate`` reached through AILAB_API_BASE).
EMULATOR_KEY: Final = "demo-key"

#: The nine on/off retouching options, in the order the provider documents them.
OPTION_NAMES: Final[tuple[str, ...]] = (
    "smart_skin",
    "acne_removal",
    "spot_correction",
    "skin_brightening",
    "skin_smoothing",
    "pore_control",
    "wrinkle_reduction",
    "under_eye_correction",
    "scar_reduction",
)

# Input limits of the submit endpoint.
MAX_UPLOAD_BYTES: Final = 10 * 1024 * 1024
MAX_SIDE_EXCLUSIVE: Final = 4096
ACCEPTED_FORMATS: Final = frozenset({"JPEG", "PNG", "WEBP"})

# task_status values of the query endpoint.
TASK_QUEUED: Final = 0
TASK_PROCESSING: Final = 1
TASK_COMPLETED: Final = 2

#: Results (and their URLs) live this long after the task is created.
RESULT_TTL_SECONDS: Final = 24 * 3600
#: The provider asks clients to query a task every 5 seconds.
DOCUMENTED_POLL_INTERVAL: Final = 5.0

# error_detail.code values.
NOT_ENOUGH_CREDITS: Final = "ERROR_NOT_ENOUGH_CREDITS"
APPLICATION_NOT_EXISTS: Final = "ERROR_APPLICATIONS_NOT_EXISTS"
USER_NOT_EXISTS: Final = "ERROR_USER_NOT_EXISTS"
USER_LOCKED: Final = "ERROR_USER_LOCKED"
AI_NOT_EXISTS: Final = "ERROR_AI_NOT_EXISTS"
NO_FACE_IN_FILE: Final = "ERROR_NO_FACE_IN_FILE"
ERROR_PARAMETERS: Final = "ERROR_PARAMETERS"
MISSING_PARAMETERS: Final = "MISSING_PARAMETERS"
INVALID_PARAMETER: Final = "ERROR_INVALID_PARAMETER"
PROCESSING_FAILURE: Final = "PROCESSING_FAILURE"
RATE_LIMITED: Final = "ERROR_REQUEST_TOO_FREQUENT"
