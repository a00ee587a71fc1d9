"""The service's error tree. Every domain failure is one of these; the API maps them to HTTP in one place.

ServiceError
├── BadRequest            body is not valid JSON / NDJSON                     (400 bad_request)
├── Unauthorized          missing, unknown or revoked API key                 (401 unauthorized)
├── NotFound              no such id for this tenant                          (404 not_found)
├── Conflict              cancel of a terminal job; idempotency key in flight (409 conflict)
├── PayloadTooLarge       body over its limit                                 (413 payload_too_large)
├── UnsupportedMediaType  wrong content type                                  (415 unsupported_media_type)
├── ValidationFailed      a field out of range, a reused idempotency key      (422 validation_error)
├── RateLimited           over a tenant's rate or quota                       (429 rate_limited)
└── Unavailable           Postgres unreachable                                (503 unavailable)
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Root of every error the service reports to a client."""

    code = "internal_error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class BadRequest(ServiceError):
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


class PayloadTooLarge(ServiceError):
    """The body, upload or batch is over its limit."""

    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """The content type or file format is not one the endpoint takes."""

    code = "unsupported_media_type"


class ValidationFailed(ServiceError):
    """The request parsed but breaks a field rule; ``details`` names each bad field."""

    code = "validation_error"


class RateLimited(ServiceError):
    """The tenant is over its request rate or queued-job quota."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """A dependency the request needs (Postgres) is unreachable; nothing was written."""

    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
