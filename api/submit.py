"""Submitting jobs: commit the row first, then publish its id to Redis (the outbox pattern).

A Redis outage does not refuse a submit: the committed row keeps ``dispatched_at`` NULL and the sweeper publishes
it once Redis answers again. A Postgres outage refuses it (503) before anything is published.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import func

from api.resources import Resources
from core import errors, queue
from core.models import jobs
from core.schemas import JobRequest
from core.submission import build_job_row, request_hash

log = logging.getLogger(__name__)

_REDIS_BACKOFF_S = 1.0


async def _existing_for_key(conn: AsyncConnection, tenant_id: str, key: str) -> Any:
    return (
        (await conn.execute(select(jobs).where(jobs.c.tenant_id == tenant_id, jobs.c.idempotency_key == key)))
        .mappings()
        .first()
    )


async def submit_job(
    res: Resources, *, tenant_id: str, req: JobRequest, idempotency_key: str | None
) -> tuple[dict[str, Any], bool]:
    """Create one job (or find the one an idempotency key already made); returns the row and whether it is new."""
    row = build_job_row(
        req, tenant_id=tenant_id, max_attempts=res.settings.max_attempts, idempotency_key=idempotency_key
    )
    async with res.db.connect() as conn:
        if idempotency_key is not None:
            # One holder per (tenant, key) at a time: a second request while the first is being written is a 409.
            got = await conn.scalar(
                text("SELECT pg_try_advisory_xact_lock(hashtextextended(:k, 0))"),
                {"k": f"{tenant_id}\x00{idempotency_key}"},
            )
            if not got:
                raise errors.Conflict("a request with this Idempotency-Key is still being processed")
            existing = await _existing_for_key(conn, tenant_id, idempotency_key)
            if existing is not None:
                await conn.rollback()
                if existing["request_hash"] != request_hash(req.normalized()):
                    raise errors.ValidationFailed(
                        "this Idempotency-Key was used with a different request body",
                        [{"field": "Idempotency-Key", "message": "reused with a different body"}],
                    )
                return dict(existing), False
        created = (await conn.execute(insert(jobs).values(**row).returning(jobs))).mappings().one()
        await conn.commit()
    await dispatch(res, [(created["id"], created["queue"])])
    return dict(created), True


async def dispatch(res: Resources, pairs: list[tuple[str, str]]) -> bool:
    """Publish committed jobs and mark them dispatched; on a Redis error leave them to the sweeper."""
    if time.monotonic() < res.redis_down_until:
        return False  # Redis failed a moment ago: don't make every submit wait for its timeout
    try:
        await queue.publish_async(res.redis, res.settings.redis_prefix, pairs)
    except Exception as exc:  # Redis down or slow: the row is committed, the sweeper will publish it
        res.redis_down_until = time.monotonic() + _REDIS_BACKOFF_S
        log.warning("publish failed, %d job(s) left to the sweeper: %s", len(pairs), exc)
        return False
    try:
        async with res.db.begin() as conn:
            await conn.execute(
                update(jobs).where(jobs.c.id.in_([p[0] for p in pairs])).values(dispatched_at=func.now())
            )
    except Exception as exc:  # published but not marked: the sweeper publishes again, a harmless duplicate
        log.warning("could not mark %d job(s) dispatched: %s", len(pairs), exc)
    return True
