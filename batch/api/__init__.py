"""The HTTP client for the remote API and the rules for reading its answers."""

from batch.api.client import ApiClient, Submitted, TaskStatus
from batch.api.errors import ApiError, ErrorKind

__all__ = ["ApiClient", "ApiError", "ErrorKind", "Submitted", "TaskStatus"]
