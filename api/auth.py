"""API key lookup: hash the presented key, find its tenant, and remember the answer for a few seconds.

A revocation reaches every API process at once: ``zimage-admin`` publishes it on Redis after its commit
(``core.apikeys.announce``), and each process's ``KeyCache`` drops what it held for that key or tenant. Should the
message be lost (Redis down), the cache's TTL still bounds how long a revoked key keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import asyncio as aioredis
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import func

from core import apikeys
from core.models import api_keys, tenants

log = logging.getLogger(__name__)

_RECONNECT_S = 1.0


@dataclass(frozen=True)
class Caller:
    """Who presented an active key: the tenant, and its own request rate limit (None: the setting's default)."""

    tenant_id: str
    rate_limit_rps: int | None


class KeyCache:
    """Maps presented keys to callers; a revoked key stops working at once (through Redis), or within ``ttl_s``."""

    def __init__(self, db: AsyncEngine, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self._db = db
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: dict[str, tuple[float, Caller | None]] = {}
        # Counts invalidations: a lookup that began before one does not store what it read.
        self.invalidations = 0
        self._task: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self.listening = asyncio.Event()

    async def tenant_for(self, key: str) -> str | None:
        """The tenant owning an active ``key``, or None."""
        caller = await self.caller_for(key)
        return None if caller is None else caller.tenant_id

    async def caller_for(self, key: str) -> Caller | None:
        """The caller presenting ``key`` when it is active (not revoked, or within a rotation's grace), or None."""
        digest = apikeys.hash_key(key)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self.invalidations
        async with self._db.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.tenant_id, api_keys.c.key_hash, api_keys.c.revoked_at, tenants.c.rate_limit_rps)
                    .join(tenants, tenants.c.id == api_keys.c.tenant_id)
                    .where(
                        api_keys.c.key_hash == digest,
                        or_(api_keys.c.revoked_at.is_(None), api_keys.c.revoked_at > func.now()),
                    )
                )
            ).first()
        caller = None
        expires = now + self._ttl_s
        if row is not None and apikeys.matches(key, row.key_hash):
            caller = Caller(row.tenant_id, row.rate_limit_rps)
            if row.revoked_at is not None:  # rotated: valid until its grace ends, and not a moment longer here
                expires = min(expires, now + (row.revoked_at - datetime.now(UTC)).total_seconds())
        if generation == self.invalidations:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[digest] = (expires, caller)
        return caller

    def invalidate(self, message: str) -> None:
        """Forget a key (``key:<hash>``), a tenant's keys (``tenant:<id>``), or everything (anything else)."""
        self.invalidations += 1
        kind, _, value = message.partition(":")
        if kind == "key":
            self._entries.pop(value, None)
        elif kind == "tenant":
            for digest in [d for d, (_, c) in self._entries.items() if c is not None and c.tenant_id == value]:
                del self._entries[digest]
        else:
            self._entries.clear()

    def start(self, redis_url: str, prefix: str) -> None:
        """Listen for revocations on Redis (in the app's event loop), on a connection of its own."""
        # No read timeout: the subscription is silent until something is revoked.
        self._redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=_RECONNECT_S)
        self._task = asyncio.create_task(
            self._listen(self._redis, apikeys.revocation_channel(prefix)), name="key-cache"
        )

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            await self._redis.aclose()

    async def _listen(self, redis: aioredis.Redis, channel: str) -> None:
        while True:
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self.invalidate("*")  # what was published while not subscribed is unknown: forget everything
                self.listening.set()
                async for message in pubsub.listen():
                    data = message.get("data")
                    self.invalidate(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: the TTL bounds how long a revoked key still works
                if self.listening.is_set():
                    log.warning("key cache lost Redis (%s); revocations apply within %.0f s", exc, self._ttl_s)
                self.listening.clear()
                await asyncio.sleep(_RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
