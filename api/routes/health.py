"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.deps import ResourcesDep
from core import storage

router = APIRouter(tags=["health"])

_PROBE_TIMEOUT_S = 2.0
_DEPTH_MAX_AGE_S = 2.0

# Whether more than :bound jobs are queued, reading at most bound + 1 entries of the queued jobs' index.
_QUEUED_OVER = text("SELECT count(*) FROM (SELECT 1 FROM jobs WHERE status = 'queued' LIMIT :bound + 1) q")


class QueueDepth:
    """Whether the queue is deeper than an operator's bound (``readyz_max_queue_depth``), read at most every
    two seconds however often the load balancer asks; a count that fails leaves the last answer."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.over = False
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def is_over(self, db: AsyncEngine) -> bool:
        """True while more than ``bound`` jobs are queued."""
        if time.monotonic() - self._read_at >= _DEPTH_MAX_AGE_S:
            async with self._lock:
                if time.monotonic() - self._read_at >= _DEPTH_MAX_AGE_S:
                    self._read_at = time.monotonic()
                    with contextlib.suppress(Exception):  # Postgres down: its own check says so
                        async with db.connect() as conn:
                            count = await conn.scalar(_QUEUED_OVER, {"bound": self.bound})
                        self.over = int(count or 0) > self.bound
        return self.over


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process is up."""
    return {"status": "ok"}


async def _postgres(res: Any) -> bool:
    async with res.db.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return True


async def _redis(res: Any) -> bool:
    return bool(await res.redis.ping())


async def _s3(res: Any) -> bool:
    return await asyncio.to_thread(storage.ping, res.s3, res.settings.s3_bucket)


async def _check(probe: Any, res: Any) -> bool:
    try:
        return bool(await asyncio.wait_for(probe(res), _PROBE_TIMEOUT_S))
    except Exception:
        return False


async def _queue(res: Any) -> bool:
    return res.queue_depth is None or not await res.queue_depth.is_over(res.db)


@router.get("/readyz")
async def readyz(res: ResourcesDep) -> JSONResponse:
    """200 when Postgres, Redis and S3 all answer (and the queue is within ``readyz_max_queue_depth``, if set);
    503 otherwise, naming which did not."""
    names = ("postgres", "redis", "s3", "queue")
    results = await asyncio.gather(*(_check(p, res) for p in (_postgres, _redis, _s3, _queue)))
    checks = {n: "ok" if ok else "down" for n, ok in zip(names, results, strict=True)}
    if res.queue_depth is None:
        del checks["queue"]
    elif not results[3]:
        checks["queue"] = f"over {res.queue_depth.bound} queued jobs"
    if all(results):
        return JSONResponse({"status": "ready", "checks": checks})
    down = ", ".join(n for n, ok in zip(names, results, strict=True) if not ok)
    body = {"error": {"code": "unavailable", "message": f"not ready: {down}", "details": [checks]}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
