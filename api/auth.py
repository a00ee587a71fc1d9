"""API key lookup: hash the presented key, find its tenant, and remember the answer for a few seconds."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core import apikeys
from core.models import api_keys


class KeyCache:
    """Maps presented keys to tenant ids; a revoked key stops working within ``ttl_s``."""

    def __init__(self, db: AsyncEngine, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self._db = db
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: dict[str, tuple[float, str | None]] = {}

    async def tenant_for(self, key: str) -> str | None:
        """The tenant owning an active ``key``, or None."""
        digest = apikeys.hash_key(key)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self._db.connect() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.tenant_id, api_keys.c.key_hash).where(
                        api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None)
                    )
                )
            ).first()
        tenant = row.tenant_id if row is not None and apikeys.matches(key, row.key_hash) else None
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[digest] = (now + self._ttl_s, tenant)
        return tenant
