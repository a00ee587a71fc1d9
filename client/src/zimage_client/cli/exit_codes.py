"""The ``zimage`` command's exit codes, for shell scripts, and the error each one stands for."""

from __future__ import annotations

from ..config import ConfigError
from ..errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InvalidWebhook,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    ValidationError,
    ZImageError,
)

OK = 0  # done; every job succeeded
FAILED = 1  # a job or batch failed or was canceled; nothing left to cancel; a file or webhook did not verify
USAGE = 2  # bad arguments or input file, no URL / key, or a request the API refused as invalid (400 413 415 422)
AUTH = 3  # the API key is missing, unknown or revoked (401)
NOT_FOUND = 4  # no such job, batch or upload for this key (404)
UNAVAILABLE = 5  # the service is unreachable, unavailable (503), rate limiting (429) or failing (500); a timeout
INTERRUPTED = 130  # Ctrl-C (SIGINT); `zimage batch` resumes where it stopped when run again

HELP = (
    f"Exit codes: {OK} ok; {FAILED} a job or batch failed (or was canceled, or a download or webhook did not "
    f"verify); {USAGE} usage error, or a request the API refused as invalid; {AUTH} bad API key; {NOT_FOUND} no "
    f"such id; {UNAVAILABLE} service unreachable, unavailable or failing, or a wait timed out; {INTERRUPTED} "
    "interrupted (Ctrl-C)."
)


def for_error(exc: Exception) -> int:
    """The exit code of an error that ended a command."""
    if isinstance(exc, ConfigError):
        return USAGE
    if isinstance(exc, Unauthorized):
        return AUTH
    if isinstance(exc, NotFound):
        return NOT_FOUND
    if isinstance(exc, BadRequest | MethodNotAllowed | PayloadTooLarge | UnsupportedMediaType | ValidationError):
        return USAGE
    if isinstance(exc, Conflict | ChecksumMismatch | InvalidWebhook):
        return FAILED
    if isinstance(exc, ZImageError):
        return UNAVAILABLE  # 429, 500, 503, unreachable, wait timeout
    return FAILED
