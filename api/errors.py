"""The mapping from errors to HTTP answers, in one place. Every error body is ``{"error": {...}}``."""

from __future__ import annotations

import logging
import re

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import errors
from core.metrics import RATE_LIMITED

log = logging.getLogger(__name__)

# The HTTP status of each branch of the error tree; the nearest ancestor of an error's class decides.
STATUS: dict[type[errors.ServiceError], int] = {
    errors.InvalidInput: 422,
    errors.BadRequest: 400,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.Unauthorized: 401,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.RateLimited: 429,
    errors.Transient: 503,
}


def http_status(exc: errors.ServiceError) -> int:
    """The HTTP status of a service error: its nearest mapped ancestor's, else 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def error_response(
    status: int, code: str, message: str, details: list | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error answer with the body the API reference fixes."""
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    return service_error_response(exc)


def service_error_response(exc: errors.ServiceError) -> JSONResponse:
    """The answer to a service error (also for middleware, which runs outside the exception handlers)."""
    status = http_status(exc)
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(getattr(exc, "retry_after_s", 2))
    if isinstance(exc, errors.RateLimited):
        RATE_LIMITED.labels(exc.reason).inc()
    if status == 500:  # a branch no client should see: an internal failure, not to be detailed
        log.error("unmapped service error", exc_info=exc)
        return error_response(500, "internal_error", "internal error")
    if isinstance(exc, errors.Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(status, exc.code, exc.message, exc.details, headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return error_response(400, "bad_request", "the body is not valid JSON")
    if any(e.get("loc") == ("body",) and e.get("type") == "missing" for e in errs):
        return error_response(400, "bad_request", "a JSON body is required")
    details = []
    for e in errs:
        loc = [str(p) for p in e["loc"] if p not in ("body", "query", "header", "path")]
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        details.append({"field": ".".join(loc) or "body", "message": msg})
    fields = ", ".join(d["field"] for d in details)
    return error_response(422, "validation_error", f"invalid request: {fields}", details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405 and (allowed := allowed_methods(request)):
        headers = {**(headers or {}), "Allow": allowed}
    return error_response(exc.status_code, code, message, headers=headers)


_METHODS = ("GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE")


def allowed_methods(request: Request) -> str | None:
    """Every method the path serves, as the API document lists them (a path served by several routes, such as
    ``GET`` and ``POST /v1/jobs``, would otherwise name only the first route's)."""
    table = getattr(request.app.state, "allowed_methods", None)
    if table is None:
        table = [
            (re.compile("^" + re.sub(r"\{[^/}]+\}", "[^/]+", path) + "$"), sorted(m.upper() for m in operations))
            for path, operations in request.app.openapi()["paths"].items()
        ]
        table = [(pattern, [m for m in methods if m in _METHODS]) for pattern, methods in table]
        request.app.state.allowed_methods = table
    for pattern, methods in table:
        if pattern.match(request.url.path):
            return ", ".join(methods)
    return None


async def _database_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return error_response(
        503, "unavailable", "the database is unavailable; nothing was written", headers={"Retry-After": "2"}
    )


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error")


def install(app: FastAPI) -> None:
    """Register every error handler on ``app``."""
    app.add_exception_handler(errors.ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(InterfaceError, _database_down)
    # The group insert runs on the driver's connection: its errors arrive unwrapped.
    app.add_exception_handler(psycopg.OperationalError, _database_down)
    app.add_exception_handler(psycopg.InterfaceError, _database_down)
    app.add_exception_handler(DBAPIError, _database_down_or_bug)
    app.add_exception_handler(Exception, _unexpected)


async def _database_down_or_bug(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if exc.connection_invalidated:
        return await _database_down(request, exc)
    return await _unexpected(request, exc)
