"""Requests per second per tenant, checked before a request's body is read.

``RateLimit`` is ASGI middleware: a request that presents a bearer key has it looked up (``KeyCache``) as soon as
its headers are in; an unknown or revoked key is answered 401 and a tenant over its rate 429, without reading a
byte of the body. Otherwise the caller travels in the request's scope to ``api.deps.get_tenant``, which then has
nothing left to look up.

The count lives in Redis, shared by every API process, through the ``limits`` package (fixed one-second windows:
one call per tenant for the requests that arrive together, at most one in flight). Should Redis fail, the limiter
lets requests through (fail open) and counts them in ``zimage_rate_limiter_failopen_total``: Postgres still decides
the quotas that protect the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis import asyncio as aioredis
from starlette.types import ASGIApp, Receive, Scope, Send

from api import errors as api_errors
from api.auth import Caller
from core import errors
from core.metrics import RATE_LIMITER_FAILOPEN

log = logging.getLogger(__name__)

# The limiter must not hold requests while Redis hangs: short timeouts, then skip it for a moment.
_TIMEOUT_S = 0.5
_SKIP_AFTER_FAILURE_S = 1.0
CALLER = "zimage.caller"  # the key of the resolved caller in the scope's state


class RateLimiter:
    """Counts each tenant's requests per second in Redis; fails open.

    A tenant's requests are counted together: one increment of their number, the way ``limits``' fixed window
    counts a hit of that cost, and the counter's new value says exactly which of them are within the limit (the
    first ``limit - count before`` are, the rest are not). At most one count per tenant is in flight: requests
    that arrive while it is wait for the next one, which counts all of them. So a tenant's Redis calls are bounded
    by one per round trip, not one per request (nor per turn of the event loop: under 32 clients that was 13 %
    of the API's rate).
    """

    def __init__(self, redis_url: str, prefix: str) -> None:
        self._pool = aioredis.ConnectionPool.from_url(
            redis_url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S
        )
        shared: dict[str, Any] = {"connection_pool": self._pool}  # limits types its options as scalars
        storage = RedisStorage(
            "async+" + redis_url, implementation="redispy", key_prefix=f"{prefix}ratelimit", **shared
        )
        self._limiter = FixedWindowRateLimiter(storage)
        self._items: dict[int, RateLimitItem] = {}
        self._skip_until = 0.0
        self._pending: dict[tuple[str, int], list[asyncio.Future[bool]]] = {}
        self._counting: dict[tuple[str, int], asyncio.Task[None]] = {}  # the count in flight, per tenant and rate

    async def allow(self, tenant_id: str, rps: int) -> bool:
        """Count one request of ``tenant_id``; False when it is over ``rps`` in this second (0: no limit)."""
        if rps <= 0:
            return True
        if time.monotonic() < self._skip_until:
            RATE_LIMITER_FAILOPEN.inc()
            return True
        key = (tenant_id, rps)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiting = self._pending.get(key)
        if waiting is None:
            self._pending[key] = [future]
            if key not in self._counting:  # else the count in flight starts the next one when it ends
                loop.call_soon(self._start, key)
        else:
            waiting.append(future)
        return await future

    def _start(self, key: tuple[str, int]) -> None:
        """Count what waits for ``key``: called once per waiting list, never while a count of ``key`` is in flight
        (``allow`` schedules it only when none is; ``_ended`` when the one in flight ends)."""
        futures = self._pending.pop(key)
        task = asyncio.create_task(self._count(key, futures))
        self._counting[key] = task
        task.add_done_callback(lambda _: self._ended(key))

    def _ended(self, key: tuple[str, int]) -> None:
        del self._counting[key]
        if key in self._pending:  # arrived while the count was in flight
            self._start(key)

    async def _count(self, key: tuple[str, int], futures: list[asyncio.Future[bool]]) -> None:
        tenant_id, rps = key
        item = self._items.get(rps)
        if item is None:
            item = self._items[rps] = RateLimitItemPerSecond(rps)
        try:
            count = await self._limiter.storage.incr(item.key_for(tenant_id), item.get_expiry(), amount=len(futures))
        except Exception as exc:  # Redis down or slow: let the requests through, Postgres still decides quotas
            RATE_LIMITER_FAILOPEN.inc(len(futures))
            self._skip_until = time.monotonic() + _SKIP_AFTER_FAILURE_S
            log.warning("rate limiter unavailable, requests pass unlimited for %.0f s: %s", _SKIP_AFTER_FAILURE_S, exc)
            within = len(futures)
        else:
            within = min(len(futures), max(0, item.amount - (count - len(futures))))
        for i, future in enumerate(futures):
            if not future.done():
                future.set_result(i < within)

    async def close(self) -> None:
        """Close the limiter's Redis connections."""
        while self._counting:  # each may start the next count of what arrived meanwhile
            await asyncio.gather(*self._counting.values(), return_exceptions=True)
        await self._pool.aclose()


def bearer_key(scope: Scope) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header; None when there is none."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            key = key.strip()
            return key if scheme.lower() == "bearer" and key else None
    return None


class RateLimit:
    """Authenticates a request that presents a key, and holds its tenant to its rate, before the body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        key = bearer_key(scope)
        if key is None:  # no key: the route decides (401, or a gallery's signed link)
            await self.app(scope, receive, send)
            return
        res = scope["app"].state.resources
        try:
            caller: Caller | None = await res.keys.caller_for(key)
        except Exception:  # Postgres down: the route's own lookup fails again, and is answered 503 there
            await self.app(scope, receive, send)
            return
        if caller is None:
            await api_errors.service_error_response(errors.Unauthorized("unknown or revoked API key"))(
                scope, receive, send
            )
            return
        rps = res.settings.rate_limit_rps if caller.rate_limit_rps is None else caller.rate_limit_rps
        if not await res.limiter.allow(caller.tenant_id, rps):
            refusal = errors.RateLimited(f"over this tenant's rate of {rps} requests per second", 1)
            await api_errors.service_error_response(refusal)(scope, receive, send)
            return
        scope.setdefault("state", {})[CALLER] = caller
        await self.app(scope, receive, send)
