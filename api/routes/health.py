"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import ResourcesDep
from core import storage

router = APIRouter(tags=["health"])

_PROBE_TIMEOUT_S = 2.0


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


@router.get("/readyz")
async def readyz(res: ResourcesDep) -> JSONResponse:
    """200 when Postgres, Redis and S3 all answer; 503 otherwise, naming which did not."""
    names = ("postgres", "redis", "s3")
    results = await asyncio.gather(*(_check(p, res) for p in (_postgres, _redis, _s3)))
    checks = {n: "ok" if ok else "down" for n, ok in zip(names, results, strict=True)}
    if all(results):
        return JSONResponse({"status": "ready", "checks": checks})
    down = ", ".join(n for n, ok in zip(names, results, strict=True) if not ok)
    body = {"error": {"code": "unavailable", "message": f"not ready: {down}", "details": [checks]}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
