"""``POST /v1/jobs`` without FastAPI's per-request machinery, for the request bulk clients send thousands of times.

Under 32 clients, FastAPI's own work around the submit route (solving its dependencies, building a ``Request``,
reading the body through it, parsing the content type with ``email.message``) was about a quarter of the API
process's CPU (py-spy), more than the submit itself. This endpoint serves only the plain case: a caller that
``api.rate_limit`` already authenticated, no ``Idempotency-Key``, a JSON body that is a valid ``JobRequest``;
it parses and validates the body as FastAPI does (``json.loads``, then the model) and calls the same
``accept_job``. Anything else goes to the FastAPI route with the body replayed, so every refusal is that route's
answer, and the FastAPI route stays the documented one (this one is not in the OpenAPI schema). Errors raised
here reach the app's exception handlers like the route's.
"""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.rate_limit import CALLER
from api.routes import jobs
from api.routes.jobs import accept_job
from core.schemas import JobRequest

PATH = "/v1/jobs"


def _json_content(scope: Scope) -> bool:
    """Whether the request says its body is ``application/json`` (FastAPI parses other JSON types too; those go
    to it)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _plain(scope: Scope) -> bool:
    """No header this endpoint leaves to the route (an idempotent submit takes the route's careful path)."""
    return all(name != b"idempotency-key" for name, _ in scope["headers"])


class FastSubmit:
    """The ASGI endpoint of ``POST /v1/jobs``, standing in front of ``route``, the FastAPI route (its fallback)."""

    def __init__(self, route: APIRoute) -> None:
        self.route = route
        self.fallback: ASGIApp = route.app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # what FastAPI's routing would set: the metrics label requests by its path
        caller = scope.get("state", {}).get(CALLER)
        if caller is None or not _json_content(scope) or not _plain(scope):
            await self.fallback(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        req = _parse(body)
        if req is None:
            await self.fallback(scope, _replay(body, receive), send)
            return
        response = await accept_job(scope["app"].state.resources, caller.tenant_id, req, None)
        await response(scope, receive, send)


def _parse(body: bytes) -> JobRequest | None:
    """The request, or None when FastAPI's route must answer (not JSON, not an object, not valid)."""
    try:  # UTF-8 only (json.loads of bytes would guess among UTF-8, 16 and 32 first): the others go to the route
        data = json.loads(body.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError too; nesting too deep to parse
        return None
    if not isinstance(data, dict):
        return None
    try:
        return JobRequest.model_validate(data)
    except (ValidationError, RecursionError):
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the body read already, then whatever the client sends next (a disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def install(app: FastAPI) -> None:
    """Route ``POST /v1/jobs`` to ``FastSubmit`` ahead of every other route, falling back to the FastAPI route."""
    route = next(
        r for r in jobs.router.routes if isinstance(r, APIRoute) and r.path == PATH and "POST" in (r.methods or ())
    )
    app.router.routes.insert(0, Route(PATH, FastSubmit(route), methods=["POST"], include_in_schema=False))
