"""Reading a job's or a batch's webhook deliveries, with every attempt, for its tenant."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from api.resources import Resources
from core import errors
from core.job_object import rfc3339
from core.models import batches, jobs, webhook_attempts, webhook_deliveries


async def list_deliveries(
    res: Resources, *, tenant_id: str, job_id: str | None = None, batch_id: str | None = None
) -> dict[str, Any]:
    """The deliveries of one job or one batch (oldest first), each with its attempts; NotFound for an unknown id
    or another tenant's."""
    subject, column, what = (
        (jobs, webhook_deliveries.c.job_id, job_id)
        if job_id is not None
        else (batches, webhook_deliveries.c.batch_id, batch_id)
    )
    async with res.db.connect() as conn:
        owned = await conn.scalar(select(subject.c.id).where(subject.c.id == what, subject.c.tenant_id == tenant_id))
        if owned is None:
            raise errors.NotFound(f"no {'job' if job_id is not None else 'batch'} {what!r}")
        rows = (
            (
                await conn.execute(
                    select(webhook_deliveries)
                    .where(column == what, webhook_deliveries.c.tenant_id == tenant_id)
                    .order_by(webhook_deliveries.c.created_at, webhook_deliveries.c.id)
                )
            )
            .mappings()
            .all()
        )
        tries = await _attempts(conn, [r["id"] for r in rows])
    return {"data": [delivery_object(r, tries.get(r["id"], [])) for r in rows]}


async def _attempts(conn: AsyncConnection, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each delivery's attempts, in order."""
    if not ids:
        return {}
    found = await conn.execute(
        select(webhook_attempts)
        .where(webhook_attempts.c.delivery_id.in_(ids))
        .order_by(webhook_attempts.c.delivery_id, webhook_attempts.c.attempt)
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for a in found.mappings():
        out.setdefault(a["delivery_id"], []).append(
            {
                "attempt": a["attempt"],
                "started_at": rfc3339(a["started_at"]),
                "status_code": a["status_code"],
                "error": a["error"],
                "latency_ms": a["latency_ms"],
            }
        )
    return out


def delivery_object(row: Any, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The API's view of a delivery: where it goes, where it stands, when it is tried next, and every attempt."""
    return {
        "id": row["id"],
        "object": "webhook_delivery",
        "url": row["url"],
        "status": row["status"],
        "created_at": rfc3339(row["created_at"]),
        "delivered_at": rfc3339(row["delivered_at"]),
        # When it is tried next: only while it waits for a retry (a delivery in flight is being tried now).
        "next_attempt_at": rfc3339(row["next_attempt_at"]) if row["status"] == "pending" else None,
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "attempts": attempts,
    }
