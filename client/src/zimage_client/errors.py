"""The SDK's errors: one root, one class per API error code, and the few failures that happen on this side.

ZImageError                      status, code, message, details
├── BadRequest                   400 bad_request
├── Unauthorized                 401 unauthorized
├── NotFound                     404 not_found
├── MethodNotAllowed             405 method_not_allowed
├── Conflict                     409 conflict
├── PayloadTooLarge              413 payload_too_large
├── UnsupportedMediaType         415 unsupported_media_type
├── ValidationError              422 validation_error
├── RateLimited                  429 rate_limited (retry_after)
├── InternalError                500 internal_error
├── Unavailable                  503 unavailable (retry_after)
│   └── ServiceUnreachable       no answer at all (connection refused, reset, timed out) after every retry
├── WaitTimeout                  wait() / wait_batch() ran past their timeout (also a TimeoutError)
├── ChecksumMismatch             a downloaded file is not the bytes its sha256 names
└── InvalidWebhook               a webhook's signature, headers or timestamp do not verify
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class ZImageError(Exception):
    """Root of every SDK error. ``status`` is the HTTP status (None when no answer came), ``code`` the API's code."""

    status: int | None = None
    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: list[Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.details: list[Any] = details or []
        self.retry_after = retry_after

    def __str__(self) -> str:
        prefix = f"{self.status} {self.code}" if self.status else self.code
        return f"{prefix}: {self.message}"


class BadRequest(ZImageError):
    """400: the body is not valid JSON or multipart, or is missing."""

    status = 400
    code = "bad_request"


class Unauthorized(ZImageError):
    """401: the API key is missing, unknown or revoked."""

    status = 401
    code = "unauthorized"


class NotFound(ZImageError):
    """404: no such id for this tenant (another tenant's id answers the same), or no such path."""

    status = 404
    code = "not_found"


class MethodNotAllowed(ZImageError):
    """405: the path exists, but not with this method."""

    status = 405
    code = "method_not_allowed"


class Conflict(ZImageError):
    """409: cancel of a terminal job, or the same Idempotency-Key still being written."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ZImageError):
    """413: a body, upload, image or batch over its limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ZImageError):
    """415: an upload that is not PNG / JPEG / WEBP, or a body of another content type."""

    status = 415
    code = "unsupported_media_type"


class ValidationError(ZImageError):
    """422: a field out of range or of the wrong type; ``details`` names each bad field."""

    status = 422
    code = "validation_error"


class RateLimited(ZImageError):
    """429: over the tenant's request rate or queued-job quota; ``retry_after`` says when to try again."""

    status = 429
    code = "rate_limited"


class InternalError(ZImageError):
    """500: a bug on the server; its logs hold the rest."""

    status = 500
    code = "internal_error"


class Unavailable(ZImageError):
    """503: a dependency of the service is down (nothing was written); ``retry_after`` says when to try again."""

    status: int | None = 503
    code = "unavailable"


class ServiceUnreachable(Unavailable):
    """The service did not answer at all (refused, reset or timed out), after every retry."""

    status = None
    code = "unreachable"


class WaitTimeout(ZImageError, TimeoutError):
    """A job or batch was still running when ``wait`` / ``wait_batch`` reached its timeout."""

    code = "wait_timeout"


class ChecksumMismatch(ZImageError):
    """A downloaded image is not the bytes its ``sha256`` names; nothing was written."""

    code = "checksum_mismatch"


class InvalidWebhook(ZImageError):
    """A webhook request whose signature, headers or timestamp do not verify."""

    code = "invalid_webhook"


BY_STATUS: dict[int, type[ZImageError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        ValidationError,
        RateLimited,
        InternalError,
        Unavailable,
    )
    if cls.status is not None
}
BY_CODE: dict[str, type[ZImageError]] = {cls.code: cls for cls in BY_STATUS.values()}


def error_for(status: int, body: bytes, retry_after: float | None = None) -> ZImageError:
    """The error an API answer means: chosen by the body's ``error.code``, else by the HTTP status."""
    code, message, details = None, "", []
    try:
        err = json.loads(body)["error"]
        if isinstance(err, Mapping):
            code, message, details = err.get("code"), str(err.get("message", "")), list(err.get("details") or [])
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace").strip()
    cls = BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = BY_STATUS.get(status, InternalError if status >= 500 else ZImageError)
    return cls(
        message or f"HTTP {status}", status=status, code=code or cls.code, details=details, retry_after=retry_after
    )
