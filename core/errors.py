"""The service's error tree: every failure it reports, to a client or on a job, is one of these.

ServiceError
├── InvalidInput            the request cannot be served as given (permanent)    job: invalid_input
│   ├── BadRequest          the body is not valid JSON / NDJSON / multipart      400 bad_request
│   ├── PayloadTooLarge     a body, upload or batch over its limit               413 payload_too_large
│   ├── UnsupportedMediaType  a content type or file format not taken           415 unsupported_media_type
│   └── ValidationFailed    a field out of range, a reused idempotency key       422 validation_error
├── Unauthorized            missing, unknown or revoked API key                  401 unauthorized
├── NotFound                no such id for this tenant                           404 not_found
├── Conflict                cancel of a terminal job; idempotency key in flight  409 conflict
├── RateLimited             over a tenant's rate or quota                        429 rate_limited
├── Transient               a dependency failed; the same call may work later    503 unavailable; job: retried
│   └── Unavailable         Postgres unreachable; nothing was written            503 unavailable
├── StorageError            an S3 call failed (permanent)                        job: internal_error
│   └── TransientStorageError  S3 5xx, throttling, timeout (also a Transient)  job: retried
├── OutOfMemory             one image does not fit the accelerator               job: out_of_memory
└── Interrupted             a running batch was stopped (cancel, time limit, shutdown)   job: timeout when timed out

The mapping to HTTP lives in ``api/errors.py``; the mapping to a failed job's ``error.code`` is ``job_error_code``
below. Both walk the class's ancestry, so a new leaf is mapped by the branch it joins.
"""

from __future__ import annotations

from typing import Any

from core.status import ErrorCode


class ServiceError(Exception):
    """Root of every error the service reports, to a client or on a job."""

    code = "internal_error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidInput(ServiceError):
    """The request cannot be served as given: running it again cannot help."""

    code = "validation_error"


class BadRequest(InvalidInput):
    """The body could not be parsed at all."""

    code = "bad_request"


class Unauthorized(ServiceError):
    """No valid API key was presented."""

    code = "unauthorized"


class NotFound(ServiceError):
    """The id does not exist for this tenant (another tenant's id looks exactly the same)."""

    code = "not_found"


class Conflict(ServiceError):
    """The request conflicts with the current state of the resource."""

    code = "conflict"


class PayloadTooLarge(InvalidInput):
    """The body, upload or batch is over its limit."""

    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    """The content type or file format is not one the endpoint takes."""

    code = "unsupported_media_type"


class ValidationFailed(InvalidInput):
    """The request parsed but breaks a field rule; ``details`` names each bad field."""

    code = "validation_error"


class RateLimited(ServiceError):
    """The tenant is over its request rate or queued-job quota."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int = 1, *, reason: str = "rate_limit_rps") -> None:
        super().__init__(message, [{"field": reason, "message": f"over this tenant's {reason}"}])
        self.retry_after_s = retry_after_s
        self.reason = reason  # the limit: rate_limit_rps, max_queued_jobs or max_images_per_day


class Transient(ServiceError):
    """A dependency failed in a way that may pass: the same call may succeed if retried later."""

    code = "unavailable"


class Unavailable(Transient):
    """A dependency the request needs (Postgres) is unreachable; nothing was written."""

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StorageError(ServiceError):
    """An S3 call failed; ``transient`` says whether the same call may succeed if retried later."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.s3_code = code
        self.status = status

    @property
    def transient(self) -> bool:
        """Whether retrying may help (a TransientStorageError)."""
        return isinstance(self, Transient)


class TransientStorageError(StorageError, Transient):
    """An S3 call failed with a 5xx, throttling, a timeout or a lost connection."""


class OutOfMemory(ServiceError):
    """One image does not fit in accelerator memory, even alone. The engine returns it in place of a request's
    images (its batch-mates still get theirs)."""

    code = "out_of_memory"


class Interrupted(ServiceError):
    """A running batch was stopped at a denoising step: ``reason`` is canceled, timeout or shutdown."""

    code = "internal_error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


# What a failed job records for each branch of the tree (the nearest ancestor decides).
_JOB_CODES: dict[type[ServiceError], ErrorCode] = {
    InvalidInput: ErrorCode.INVALID_INPUT,
    NotFound: ErrorCode.INVALID_INPUT,  # an input the job names (an upload) is gone
    OutOfMemory: ErrorCode.OUT_OF_MEMORY,
}


def job_error_code(exc: BaseException) -> ErrorCode:
    """The ``error.code`` a job that failed with ``exc`` records: internal_error for anything unforeseen."""
    if isinstance(exc, Interrupted) and exc.reason == "timeout":
        return ErrorCode.TIMEOUT
    for cls in type(exc).__mro__:
        if cls in _JOB_CODES:
            return _JOB_CODES[cls]
    return ErrorCode.INTERNAL_ERROR
