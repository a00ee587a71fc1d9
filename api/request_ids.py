"""Request ids: every request gets one (the client's ``X-Request-ID`` when it is sane, else a new one), every log
line written while it is handled carries it, and the response echoes it."""

from __future__ import annotations

import random
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs

HEADER = b"x-request-id"
MAX_CHARS = 128
_SANE = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def request_id(offered: bytes | None) -> str:
    """The client's id when it is 1-128 characters of ``A-Za-z0-9._-`` (nothing a log or header could be
    abused with), else a new random one."""
    if offered is not None and _SANE.fullmatch(offered):
        return offered.decode("ascii")
    # 128 bits from ``random`` (re-seeded in every forked child): an id must be unique, not secret, and a system
    # call per request (os.urandom) was 2 % of the API's CPU under a bulk load.
    return f"{random.getrandbits(128):032x}"


class RequestIds:
    """ASGI middleware: binds the request's id to the logging context and adds it to the response headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = next((value for name, value in scope["headers"] if name == HEADER), None)
        rid = request_id(offered)
        echoed = (HEADER, rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        # Set for the rest of the request's task, not reset on the way out: the server's own log of an unhandled
        # error is written outside this middleware, and must carry the id too (each request is its own task).
        logs.set_fields(request_id=rid)
        await self.app(scope, receive, send_with_id)
