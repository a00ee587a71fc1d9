"""Keeping the API process's memory bounded when clients send large bodies, valid or not.

The lifespan tunes the garbage collector for latency (``gc.freeze`` and a young-generation threshold of 100 000
allocations): few collections under load. The price is that garbage kept alive by reference cycles waits long
for a collection, and a refused body is exactly that: the parse error's traceback holds the frames that hold the
body (as bytes, and again as the decoded text). A few hundred 600 KB invalid-JSON bodies grew the process from
150 MB to 1.4-1.65 GB and it stayed there. Two fixes, both here:

- ``BodyMemory`` counts request body bytes and runs a full collection once every ``every_bytes`` of them (16 MiB:
  a collection every ~27 such bodies, a few ms each; ordinary 1 KB submissions trigger one every ~16 000).
- ``return_freed_memory`` fixes glibc's mmap threshold at 128 KiB: a freed body then goes back to the operating
  system at once, instead of staying in the heap (glibc otherwise raises the threshold to the size of the
  largest freed block, after which bodies of that size come from the heap and fragment it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

COLLECT_EVERY_BYTES = 16 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 128 << 10


def return_freed_memory() -> bool:
    """Make large blocks (request bodies) go back to the operating system when freed; False where the C library
    is not glibc (nothing to do there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False


class BodyMemory:
    """ASGI middleware: a full garbage collection after every ``every_bytes`` of request bodies."""

    def __init__(self, app: ASGIApp, every_bytes: int = COLLECT_EVERY_BYTES) -> None:
        self.app = app
        self.every_bytes = every_bytes
        self.received = 0  # body bytes since the last collection
        self.collections = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            if self.received >= self.every_bytes:
                self.received = 0
                self.collections += 1
                gc.collect()
