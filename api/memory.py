"""Keeping the API process's memory bounded when clients send large bodies, valid or not, or many requests at once.

The lifespan tunes the garbage collector for latency (``gc.freeze`` and a young-generation threshold of 100 000
allocations): few collections under load. The price is that garbage kept alive by reference cycles waits long
for a collection, and a refused body is exactly that: the parse error's traceback holds the frames that hold the
body (as bytes, and again as the decoded text). A few hundred 600 KB invalid-JSON bodies grew the process from
150 MB to 1.4-1.65 GB and it stayed there. Three fixes, all here:

- ``BodyMemory`` counts request body bytes and runs a full collection once every ``every_bytes`` of them (16 MiB:
  a collection every ~27 such bodies, a few ms each; ordinary 1 KB submissions trigger one every ~16 000).
- ``return_freed_memory`` fixes glibc's mmap threshold at 128 KiB: a freed body then goes back to the operating
  system at once, instead of staying in the heap (glibc otherwise raises the threshold to the size of the
  largest freed block, after which bodies of that size come from the heap and fragment it).
- Every ``trim_every_s`` (and after each such collection) ``BodyMemory`` has glibc hand the heap's free pages
  back (``malloc_trim``): a burst of concurrent requests leaves the heap fragmented, 80 MB
  above its start after a few seconds of four clients, which glibc otherwise keeps for good.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

COLLECT_EVERY_BYTES = 16 << 20
TRIM_EVERY_S = 10.0
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 128 << 10


def _glibc() -> Any:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, TypeError):
        return None


_LIBC = _glibc()


def return_freed_memory() -> bool:
    """Make large blocks (request bodies) go back to the operating system when freed; False where the C library
    is not glibc (nothing to do there)."""
    return _LIBC is not None and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def trim_heap() -> None:
    """Give the heap's free pages back to the operating system (glibc; elsewhere nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class BodyMemory:
    """ASGI middleware: a full garbage collection after every ``every_bytes`` of request bodies, and the heap's
    free pages given back every ``trim_every_s`` from the first request on."""

    def __init__(
        self, app: ASGIApp, every_bytes: int = COLLECT_EVERY_BYTES, trim_every_s: float = TRIM_EVERY_S
    ) -> None:
        self.app = app
        self.every_bytes = every_bytes
        self.trim_every_s = trim_every_s
        self.received = 0  # body bytes since the last collection
        self.collections = 0
        self._trimming = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._trimming:
            self._trimming = True
            asyncio.get_running_loop().call_later(self.trim_every_s, self._trim_periodically)

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
                self._trim()

    def _trim(self) -> None:
        # On the event loop's own thread: glibc gives each thread an arena of its own, and a worker thread's would
        # add to the memory this is meant to give back. A trim takes about a millisecond.
        trim_heap()

    def _trim_periodically(self) -> None:
        self._trim()
        asyncio.get_running_loop().call_later(self.trim_every_s, self._trim_periodically)
