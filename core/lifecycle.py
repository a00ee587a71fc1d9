"""Worker-side job writes: claim a batch, heartbeat progress, record success or failure, give a job back.

Each is one conditional UPDATE built by ``core.transition`` from the state machine; a claimed job's writes are
fenced by the attempt it was claimed with: a stale worker's late write matches no row and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Float, case, func, literal, literal_column, select, text

from core import fair_share
from core.events import EVENT_COLUMNS, JobEvent, from_rows
from core.models import jobs
from core.status import ErrorCode, JobStatus
from core.transition import transition
from core.work import progress_total

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds: its id and attempt (the fencing token) and what to run."""

    id: str
    tenant_id: str
    attempt: int
    max_attempts: int
    kind: str
    request: dict[str, Any]
    batch_id: str | None = None  # the bulk submission it came in (logs)
    created_at: datetime | None = None  # when it was submitted (its latency is measured from here)

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of each output image: image i uses the request's seed + i."""
        return tuple(self.request["seed"] + i for i in range(self.request["num_images"]))


# Fair share (``core.fair_share``) ranks the tenants with queued jobs (``:tenants``, first served first). The
# first of them with a job not locked by another claimer gives the head (its highest priority, then oldest job),
# which decides the group; then as many queued jobs of that group as fit the image and token budgets, the head's
# tenant's first, then the other tenants' in rank order, each tenant's in priority and age order (a retried
# job alone). Each tenant's jobs are read from its own index range, so a tenant's 10 000 queued jobs cost a
# claim nothing when another is served. Rows locked by another claimer are skipped, never waited for. (Window
# functions cannot take FOR UPDATE, hence the locked candidates first.) The chosen rows stay locked until the
# claim's transition below commits.
_CHOOSE = text(
    f"""
WITH ranked AS (
    SELECT tenant_id, rank FROM unnest(CAST(:tenants AS text[])) WITH ORDINALITY AS r(tenant_id, rank)
), head AS (
    SELECT h.id, h.group_key, h.attempt, h.tenant_id
    FROM (SELECT tenant_id, rank FROM ranked ORDER BY rank) r
    CROSS JOIN LATERAL (
        SELECT id, group_key, attempt, tenant_id FROM jobs
        WHERE status = '{JobStatus.QUEUED}' AND queue = :queue AND tenant_id = r.tenant_id
          AND (attempt = 0 OR NOT :fresh_only)
        ORDER BY priority DESC, created_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) h
    ORDER BY r.rank
    LIMIT 1
), fill AS (
    SELECT j.id, j.cost_tokens, j.priority, j.created_at, j.request, j.images, r.fill
    FROM (
        SELECT tenant_id, CASE WHEN tenant_id = (SELECT tenant_id FROM head) THEN 0 ELSE rank END AS fill
        FROM ranked
        -- A job that already lost a worker runs alone: a poison job must not burn its batch-mates' attempts.
        WHERE (SELECT attempt FROM head) = 0
        ORDER BY fill
    ) r
    CROSS JOIN LATERAL (
        SELECT j.id, j.cost_tokens, j.priority, j.created_at, j.request,
               (j.request->>'num_images')::int AS images
        FROM jobs j
        WHERE j.status = '{JobStatus.QUEUED}' AND j.queue = :queue AND j.tenant_id = r.tenant_id
          AND j.group_key = (SELECT group_key FROM head) AND j.attempt = 0 AND j.id <> (SELECT id FROM head)
        ORDER BY j.priority DESC, j.created_at
        LIMIT :max_images
        FOR UPDATE OF j SKIP LOCKED
    ) j
    -- Tenant by tenant, each in its own order: a tenant's jobs are read (and locked) only while the batch
    -- still has room for them.
    ORDER BY r.fill
    LIMIT :max_images
), cand AS (
    SELECT j.id, j.cost_tokens, j.priority, j.created_at, j.request,
           (j.request->>'num_images')::int AS images, 0 AS fill
    FROM jobs j JOIN head ON j.id = head.id
    UNION ALL
    SELECT * FROM fill
)
SELECT id, request FROM (
    SELECT id, request,
           row_number() OVER w AS rn,
           sum(cost_tokens) OVER w AS tokens,
           sum(images) OVER w AS images
    FROM cand
    WINDOW w AS (ORDER BY fill, priority DESC, created_at, id)
) c
WHERE rn = 1 OR (tokens <= :token_budget AND images <= :max_images)
"""
)

_CLAIMED = (
    jobs.c.id,
    jobs.c.tenant_id,
    jobs.c.attempt,
    jobs.c.max_attempts,
    jobs.c.kind,
    jobs.c.request,
    jobs.c.created_at,
    jobs.c.priority,
    jobs.c.cost_tokens,
)
# The event columns a claim's RETURNING does not already have.
_EVENT_EXTRA = tuple(c for c in EVENT_COLUMNS if not any(c is d for d in _CLAIMED))


def claim_batch(
    conn: Connection,
    *,
    queue: str,
    worker_id: str,
    lease_s: float,
    max_images: int,
    token_budget: int,
    fresh_only: bool = False,
    events: list[JobEvent] | None = None,
) -> list[ClaimedJob]:
    """Claim the next batch of compatible queued jobs of ``queue`` (may be empty) and advance the clocks of the
    tenants it serves (``core.fair_share``), in one transaction; commits.

    ``fresh_only`` skips jobs that already lost a worker (a claim made ahead of time, while another batch runs,
    must not put them at risk again should that batch crash the worker). ``events`` (when given) receives each
    claimed job's event, to publish once the claim is committed (``core.events``).
    """
    clocks = fair_share.queued_tenants(conn, queue, fresh_only=fresh_only)
    order = fair_share.service_order(clocks)
    params = {
        "queue": queue,
        "tenants": order,
        "max_images": max_images,
        "token_budget": token_budget,
        "fresh_only": fresh_only,
    }
    chosen = conn.execute(_CHOOSE, params).all() if order else []
    if not chosen:
        conn.rollback()
        return []
    totals = {row.id: progress_total(row.request) for row in chosen}
    claim = transition(
        JobStatus.RUNNING,
        where=[jobs.c.id.in_(list(totals))],
        values={
            "attempt": jobs.c.attempt + 1,
            "lease_expires_at": _lease(lease_s),
            "worker_id": worker_id,
            "started_at": func.clock_timestamp(),
            "progress_step": 0,
            "progress_total": case(totals, value=jobs.c.id),
        },
    )
    rows = conn.execute(claim.returning(*_CLAIMED, *_EVENT_EXTRA)).mappings().all()
    served: dict[str, int] = {}
    for r in rows:
        served[r["tenant_id"]] = served.get(r["tenant_id"], 0) + r["cost_tokens"]
    fair_share.advance(conn, served, clocks, token_budget=token_budget)
    conn.commit()
    _collect(events, rows)
    rows = sorted(rows, key=lambda r: (-r["priority"], r["created_at"], r["id"]))
    return [
        ClaimedJob(
            id=r["id"],
            tenant_id=r["tenant_id"],
            attempt=r["attempt"],
            max_attempts=r["max_attempts"],
            kind=r["kind"],
            request=r["request"],
            batch_id=r["batch_id"],
            created_at=r["created_at"],
        )
        for r in rows
    ]


_SNAPSHOT = text(
    f"""
SELECT coalesce(sum((request->>'num_images')::int), 0),
       count(*) FILTER (WHERE created_at > clock_timestamp() - make_interval(secs => :window_s))
FROM jobs WHERE status = '{JobStatus.QUEUED}' AND queue = :queue
"""
)


def queue_snapshot(conn: Connection, queue: str, *, window_s: float) -> tuple[int, int]:
    """Images queued in ``queue``, and how many of its queued jobs arrived within the last ``window_s``."""
    images, recent = conn.execute(_SNAPSHOT, {"queue": queue, "window_s": window_s}).one()
    conn.commit()
    return int(images), int(recent)


def _lease(lease_s: float) -> ColumnElement[Any]:
    """A lease that ends ``lease_s`` seconds from now."""
    return func.clock_timestamp() + literal(float(lease_s), Float) * literal_column("interval '1 second'")


def _collect(events: list[JobEvent] | None, rows: Sequence[Any]) -> None:
    """Add the events of a committed write's rows to ``events`` (when the caller asked for them)."""
    if events is not None:
        events.extend(from_rows(rows))


def heartbeat(
    conn: Connection,
    jobs_: Sequence[ClaimedJob],
    *,
    steps: Sequence[int],
    lease_s: float,
    events: list[JobEvent] | None = None,
) -> set[str]:
    """Record each job's progress (``steps[i]`` for ``jobs_[i]``) and renew the leases of the jobs this worker
    still holds; returns their ids. A job missing from the answer was canceled (or its lease was lost): the
    worker must not write it again. ``events`` receives the progress events to publish."""
    progress = {job.id: step for job, step in zip(jobs_, steps, strict=True)}
    write = transition(
        JobStatus.RUNNING,
        fence=jobs_,
        values={"progress_step": case(progress, value=jobs.c.id), "lease_expires_at": _lease(lease_s)},
    )
    rows = conn.execute(write.returning(*EVENT_COLUMNS)).mappings().all()
    conn.commit()
    _collect(events, rows)
    return {r["id"] for r in rows}


def renew_leases(conn: Connection, jobs_: Sequence[ClaimedJob], *, lease_s: float) -> set[str]:
    """Extend the leases of the jobs this worker still holds (no progress change); returns their ids."""
    write = transition(JobStatus.RUNNING, fence=jobs_, values={"lease_expires_at": _lease(lease_s)})
    rows = conn.execute(write.returning(jobs.c.id)).scalars().all()
    conn.commit()
    return set(rows)


def record_success(
    conn: Connection,
    job: ClaimedJob,
    *,
    outputs: list[dict[str, Any]],
    inference_ms: int,
    upload_ms: int,
    events: list[JobEvent] | None = None,
) -> bool:
    """Mark a claimed job succeeded with its outputs (fenced); False when the write was stale and did nothing."""
    write = transition(
        JobStatus.SUCCEEDED,
        fence=[job],
        values={"outputs": outputs},
        timings={"inference_ms": inference_ms, "upload_ms": upload_ms},
    )
    done = conn.execute(write.returning(*EVENT_COLUMNS)).mappings().first()
    conn.commit()
    if done is not None:
        _collect(events, [done])
    else:
        # A retry after a commit whose answer was lost finds its own success: that is not a stale write.
        if _ended_as(conn, job, JobStatus.SUCCEEDED):
            return True
        log.info("stale success write ignored: job %s attempt %s", job.id, job.attempt)
    return done is not None


def _ended_as(conn: Connection, job: ClaimedJob, status: JobStatus) -> bool:
    """Whether the job already ended in ``status`` under this very attempt."""
    found = conn.execute(
        select(jobs.c.id).where(jobs.c.id == job.id, jobs.c.attempt == job.attempt, jobs.c.status == status.value)
    ).scalar()
    conn.commit()
    return found is not None


def record_failure(
    conn: Connection,
    job: ClaimedJob,
    *,
    code: ErrorCode,
    message: str,
    events: list[JobEvent] | None = None,
) -> bool:
    """Mark a claimed job failed with an error code (fenced); False when the write was stale."""
    write = transition(
        JobStatus.FAILED, fence=[job], values={"error_code": code.value, "error_message": message[:2000]}
    )
    done = conn.execute(write.returning(*EVENT_COLUMNS)).mappings().first()
    conn.commit()
    if done is not None:
        _collect(events, [done])
    return done is not None or _ended_as(conn, job, JobStatus.FAILED)


def release(conn: Connection, job: ClaimedJob, *, events: list[JobEvent] | None = None) -> bool:
    """Give a claimed job back to the queue (shutdown, transient error); the sweeper re-publishes it."""
    done = conn.execute(transition(JobStatus.QUEUED, fence=[job]).returning(*EVENT_COLUMNS)).mappings().first()
    conn.commit()
    if done is not None:
        _collect(events, [done])
    return done is not None
