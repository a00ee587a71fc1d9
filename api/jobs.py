"""Reading and canceling jobs for a tenant: get, list with a cursor, queue position, cancel."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from api.cursors import cursor_pattern, decode_cursor, encode_cursor
from api.resources import Resources
from core import errors, events, logs, metrics, queue_counts
from core.job_object import job_object
from core.models import jobs
from core.status import JobStatus, is_terminal
from core.transition import transition

log = logging.getLogger(__name__)

MAX_PAGE = 100


def log_job(res: Resources, row: Any) -> None:
    """From here on, this request's log lines are about the job ``row`` (its prompt only if logs may hold one)."""
    logs.set_fields(
        **logs.job_fields(
            job_id=row["id"],
            tenant=row["tenant_id"],
            attempt=row["attempt"],
            batch_id=row["batch_id"],
            prompt=row["request"].get("prompt"),
            log_prompts=res.settings.log_prompts,
        )
    )


# A queued job's place, read from the counters the jobs table's triggers keep (queue_counts) plus a count of the
# jobs of its own priority behind it, up to _BEHIND_CAP: O(1) for a job near the tail of a deep queue (one just
# submitted, the one a client polls), where counting those ahead would scan the whole queue.
_BEHIND_CAP = 1000
_PLACE = text(
    f"""
SELECT
  {queue_counts.AT_OR_ABOVE.format(tenant=":tenant", queue=":queue", priority=":priority")} AS at_or_above,
  (SELECT count(*) FROM (
     SELECT 1 FROM jobs
     WHERE status = 'queued' AND tenant_id = :tenant AND queue = :queue AND priority = :priority
       AND (created_at, id) >= (:created_at, :id)
     LIMIT :cap) behind) AS behind
"""
)
# Deep inside a long queue: count those ahead of it instead (bounded by the queue's length, as it always was).
_AHEAD = text(
    f"""
SELECT
  {queue_counts.AT_OR_ABOVE.format(tenant=":tenant", queue=":queue", priority=":priority + 1")}
  + (SELECT count(*) FROM jobs
     WHERE status = 'queued' AND tenant_id = :tenant AND queue = :queue AND priority = :priority
       AND (created_at, id) < (:created_at, :id))
"""
)


async def queue_positions(conn: AsyncConnection, rows: Sequence[Any]) -> dict[str, int]:
    """How many of the tenant's own queued jobs of the same queue run before each queued row (0: next of its).

    Claims share the accelerators between tenants by virtual time (``core.fair_share``) and order each tenant's
    jobs by priority then age, so a job's place is exact among its tenant's jobs; other tenants' work is
    interleaved fairly, not ahead of it. One read per (tenant, queue, priority) among ``rows``: the first row
    of each is placed against the table, and its later rows follow it one by one. So rows of one (tenant,
    queue, priority) must be neighbours in that order, as a group commit's rows are (inserted together); rows
    read one by one are passed one at a time.
    """
    order = sorted(
        (r for r in rows if r["status"] == JobStatus.QUEUED), key=lambda r: (-r["priority"], r["created_at"], r["id"])
    )
    base: dict[tuple[str, str, int], int] = {}
    for r in order:
        key = (r["tenant_id"], r["queue"], r["priority"])
        if key in base:
            continue
        params = {
            "tenant": r["tenant_id"], "queue": r["queue"], "priority": r["priority"],
            "created_at": r["created_at"], "id": r["id"], "cap": _BEHIND_CAP,
        }  # fmt: skip
        place = (await conn.execute(_PLACE, params)).one()
        if place.behind < _BEHIND_CAP:  # the row itself is among those counted behind (it is queued)
            base[key] = max(0, place.at_or_above - place.behind)
        else:
            base[key] = int(await conn.scalar(_AHEAD, params) or 0)
    seen: Counter[tuple[str, str, int]] = Counter()
    positions = {}
    for r in order:
        key = (r["tenant_id"], r["queue"], r["priority"])
        positions[r["id"]] = base[key] + seen[key]
        seen[key] += 1
    return positions


async def render(conn: AsyncConnection, res: Resources, row: Any) -> dict[str, Any]:
    """The job object of a row, with its queue position when queued."""
    position = (await queue_positions(conn, [row])).get(row["id"])
    return job_object(row, presign=res.presign, queue_position=position)


async def get_job(res: Resources, *, tenant_id: str, job_id: str) -> dict[str, Any]:
    """One job of the tenant; NotFound for an unknown id or another tenant's."""
    async with res.db.connect() as conn:
        row = (
            (await conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id)))
            .mappings()
            .first()
        )
        if row is None:
            raise errors.NotFound(f"no job {job_id!r}")
        return await render(conn, res, row)


# What a job cursor looks like (the API document states it): see api.cursors.
CURSOR_PATTERN = cursor_pattern("job_")


async def list_jobs(
    res: Resources,
    *,
    tenant_id: str,
    status: str | None = None,
    batch_id: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> dict[str, Any]:
    """A page of the tenant's jobs, newest first (ids sort by creation time)."""
    query = select(jobs).where(jobs.c.tenant_id == tenant_id)
    if status is not None:
        query = query.where(jobs.c.status == status)
    if batch_id is not None:
        query = query.where(jobs.c.batch_id == batch_id)
    if cursor is not None:
        query = query.where(jobs.c.id < decode_cursor(cursor, "job_"))
    query = query.order_by(jobs.c.id.desc()).limit(limit + 1)
    async with res.db.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
        page = rows[:limit]
        data = [await render(conn, res, r) for r in page]
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    return {"data": data, "next_cursor": next_cursor}


async def cancel_job(res: Resources, *, tenant_id: str, job_id: str) -> dict[str, Any]:
    """Cancel a queued or running job (a running one stops at its next denoising step); 409 when terminal."""
    async with res.db.connect() as conn:
        row = (
            (
                await conn.execute(
                    transition(
                        JobStatus.CANCELED, where=[jobs.c.id == job_id, jobs.c.tenant_id == tenant_id]
                    ).returning(jobs)
                )
            )
            .mappings()
            .first()
        )
        await conn.commit()
        if row is not None:
            metrics.count_ends(JobStatus.CANCELED.value)
            log_job(res, row)
            log.info("job canceled")
            await events.publish_async(res.redis, res.settings.redis_prefix, events.from_rows([row]))
            return await render(conn, res, row)
        current = (
            await conn.execute(select(jobs.c.status).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id))
        ).scalar()
    if current is None:
        raise errors.NotFound(f"no job {job_id!r}")
    assert is_terminal(current)
    raise errors.Conflict(f"job {job_id} is already {current}")
