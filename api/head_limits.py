"""Limits on a request's head (its request line and headers), where clients that never finish or never stop
sending them are dealt with.

uvicorn's httptools protocol keeps a connection that sent half its headers open forever (its keep-alive timeout
only runs between requests) and buffers headers of any size. ``GuardedHttpTools`` is that protocol with two
limits, applied while a head is incomplete, before the application sees anything:

- the whole head must arrive within ``header_timeout_s`` of its first byte (or of the connection's opening):
  else 408 ``request_timeout`` and the connection is closed (slow-loris clients hold nothing for long);
- a head over ``max_header_bytes`` is answered 431 ``headers_too_large`` and the connection closed, so no
  connection buffers more than that (plus one network read).

Run uvicorn with it: ``uvicorn api.main:create_app --factory --http api.head_limits:GuardedHttpTools``.

``HeadLimit`` is ASGI middleware for the finer rules, on the parsed head: a header value over
``max_header_value_bytes`` is 431 too, a query string of more than ``max_query_params`` parameters is 400, and a
NUL character in the path is 404 (no resource has one).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api import errors
from core.settings import get_settings

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_LINGER_S = 1.0  # after a refusal, how long the connection drains before it closes


def _error_bytes(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer with the API's error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message, "details": []}}).encode()
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
        status,
        _REASONS[status],
        len(body),
    )
    return head + body


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request's head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self._header_timeout_s = settings.header_timeout_s
        self._max_head = settings.max_header_bytes
        self._in_head = False  # a head is due: from the connection's opening, or a request's first byte
        self._begun = False  # ... and that request has begun
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered 408 / 431: what still arrives is dropped until the socket closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A new connection: its first head is due within the header timeout."""
        super().connection_made(transport)
        self._in_head, self._head_bytes = True, 0
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the head timer with the connection."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse, then refuse a head that has grown past its cap without ending."""
        if self._refused or self.transport.is_closing():
            return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._refuse(431, "headers_too_large", f"the request line and headers are over {self._max_head} bytes")

    def on_message_begin(self) -> None:
        """A request starts: its head is due within the header timeout from now."""
        super().on_message_begin()
        self._begun = True
        if not self._in_head:
            self._in_head, self._head_bytes = True, 0
            self._arm()

    def on_headers_complete(self) -> None:
        """The head is complete: the application takes over (uvicorn's keep-alive timer between requests)."""
        self._in_head = self._begun = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self._header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self._refused or self.transport.is_closing():
            return
        if self._begun:
            message = f"the request line and headers did not arrive within {self._header_timeout_s:g} s"
            self._refuse(408, "request_timeout", message)
        else:  # a connection that never sent a byte: nobody to answer
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer and close, lingering: closing with unread bytes would reset the connection and could lose the
        answer, so the sending side is shut, what still arrives is dropped, and the socket closes a moment later."""
        self._in_head = False
        self._disarm()
        self._refused = True
        self.transport.write(_error_bytes(status, code, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


class HeadLimit:
    """ASGI middleware: 431 for a header value over its limit, 400 for too many query parameters."""

    def __init__(self, app: ASGIApp, max_value_bytes: int, max_query_params: int) -> None:
        self.app = app
        self.max_value_bytes = max_value_bytes
        self.max_query_params = max_query_params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if len(value) > self.max_value_bytes:
                    header = name.decode("latin-1")[:64]
                    message = f"the value of header {header!r} is over {self.max_value_bytes} bytes"
                    await errors.error_response(431, "headers_too_large", message)(scope, receive, send)
                    return
            query: bytes = scope.get("query_string", b"")
            if query and query.count(b"&") + 1 > self.max_query_params:
                message = f"more than {self.max_query_params} query parameters"
                details = [{"field": "query", "message": message}]
                await errors.error_response(400, "bad_request", message, details)(scope, receive, send)
                return
            # NUL is in no id, and Postgres cannot even compare text with one (the query's free-text parameters
            # state the same rule in the API document, and are refused by their validation).
            if "\x00" in scope["path"]:
                await errors.error_response(404, "not_found", "no such path")(scope, receive, send)
                return
        await self.app(scope, receive, send)
