"""Worker-side job transitions: claim a batch, heartbeat progress, record success or failure, sweep leases.

Each transition is one conditional UPDATE that names the status it leaves (from ``core.status``) and, for a
claimed job, the attempt it was claimed with: a stale worker's late write matches no row and changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from core.status import ErrorCode, JobStatus, sources_of

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

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of each output image: image i uses the request's seed + i."""
        return tuple(self.request["seed"] + i for i in range(self.request["num_images"]))


def _in(status: JobStatus) -> str:
    """SQL list of the statuses from which ``status`` may be reached."""
    return ", ".join(f"'{s}'" for s in sources_of(status))


# The head of the queue decides the group; then as many queued jobs of that group as fit the image and
# token budgets, highest priority first, then oldest (a retried job alone). Rows locked by another claimer
# are skipped, never waited for. (Window functions cannot take FOR UPDATE, hence the locked candidates first.)
_CLAIM = text(
    f"""
WITH head AS (
    SELECT id, group_key, attempt FROM jobs
    WHERE status = 'queued' AND queue = :queue AND (attempt = 0 OR NOT :fresh_only)
    ORDER BY priority DESC, created_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), cand AS (
    SELECT j.id, j.cost_tokens, j.priority, j.created_at,
           (j.request->>'num_images')::int AS images
    FROM jobs j JOIN head ON j.group_key = head.group_key
    WHERE j.status = 'queued' AND j.queue = :queue
      -- A job that already lost a worker runs alone: a poison job must not burn its batch-mates' attempts.
      AND (j.id = head.id OR (head.attempt = 0 AND j.attempt = 0))
    ORDER BY j.priority DESC, j.created_at
    LIMIT :max_images
    FOR UPDATE OF j SKIP LOCKED
), chosen AS (
    SELECT id FROM (
        SELECT id,
               row_number() OVER w AS rn,
               sum(cost_tokens) OVER w AS tokens,
               sum(images) OVER w AS images
        FROM cand
        WINDOW w AS (ORDER BY priority DESC, created_at, id)
    ) c
    WHERE rn = 1 OR (tokens <= :token_budget AND images <= :max_images)
)
UPDATE jobs SET
    status = '{JobStatus.RUNNING}',
    attempt = jobs.attempt + 1,
    lease_expires_at = clock_timestamp() + make_interval(secs => :lease_s),
    worker_id = :worker_id,
    started_at = clock_timestamp(),
    progress_step = 0,
    progress_total = (jobs.request->>'steps')::int,
    updated_at = clock_timestamp()
FROM chosen
WHERE jobs.id = chosen.id AND jobs.status IN ({_in(JobStatus.RUNNING)})
RETURNING jobs.id, jobs.tenant_id, jobs.attempt, jobs.max_attempts, jobs.kind, jobs.request,
          jobs.created_at, jobs.priority
"""
)


def claim_batch(
    conn: Connection,
    *,
    queue: str,
    worker_id: str,
    lease_s: float,
    max_images: int,
    token_budget: int,
    fresh_only: bool = False,
) -> list[ClaimedJob]:
    """Claim the next batch of compatible queued jobs of ``queue`` (may be empty); commits.

    ``fresh_only`` skips jobs that already lost a worker (a claim made ahead of time, while another batch runs,
    must not put them at risk again should that batch crash the worker).
    """
    rows = (
        conn.execute(
            _CLAIM,
            {
                "queue": queue,
                "worker_id": worker_id,
                "lease_s": lease_s,
                "max_images": max_images,
                "token_budget": token_budget,
                "fresh_only": fresh_only,
            },
        )
        .mappings()
        .all()
    )
    conn.commit()
    rows = sorted(rows, key=lambda r: (-r["priority"], r["created_at"], r["id"]))
    return [
        ClaimedJob(
            id=r["id"],
            tenant_id=r["tenant_id"],
            attempt=r["attempt"],
            max_attempts=r["max_attempts"],
            kind=r["kind"],
            request=r["request"],
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


def _fence(jobs: Sequence[ClaimedJob]) -> dict[str, Any]:
    return {"ids": [j.id for j in jobs], "attempts": [j.attempt for j in jobs]}


_FENCED = "(id, attempt) IN (SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:attempts AS int[])))"

_HEARTBEAT = text(
    f"""
UPDATE jobs SET progress_step = :step,
                lease_expires_at = clock_timestamp() + make_interval(secs => :lease_s),
                updated_at = clock_timestamp()
WHERE {_FENCED} AND status = '{JobStatus.RUNNING}'
RETURNING id
"""
)


def heartbeat(conn: Connection, jobs: Sequence[ClaimedJob], *, step: int, lease_s: float) -> set[str]:
    """Record progress and renew the lease of the jobs this worker still holds; returns their ids.

    A job missing from the answer was canceled (or its lease was lost): the worker must not write it again.
    """
    rows = conn.execute(_HEARTBEAT, {**_fence(jobs), "step": step, "lease_s": lease_s}).scalars().all()
    conn.commit()
    return set(rows)


_RENEW = text(
    f"""
UPDATE jobs SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease_s)
WHERE {_FENCED} AND status = '{JobStatus.RUNNING}'
RETURNING id
"""
)


def renew_leases(conn: Connection, jobs: Sequence[ClaimedJob], *, lease_s: float) -> set[str]:
    """Extend the leases of the jobs this worker still holds (no progress change); returns their ids."""
    rows = conn.execute(_RENEW, {**_fence(jobs), "lease_s": lease_s}).scalars().all()
    conn.commit()
    return set(rows)


# SQL fragments of a job's end: its timings and the columns every terminal write resets.
_QUEUED_MS = "'queued_ms', floor(extract(epoch FROM started_at - created_at) * 1000)::bigint"
_TOTAL_MS = "'total_ms', floor(extract(epoch FROM clock_timestamp() - created_at) * 1000)::bigint"
_ENDED = """finished_at = clock_timestamp(),
    lease_expires_at = NULL,
    progress_step = NULL,
    progress_total = NULL,
    updated_at = clock_timestamp()"""

_SUCCEED = text(
    f"""
UPDATE jobs SET
    status = '{JobStatus.SUCCEEDED}',
    outputs = CAST(:outputs AS jsonb),
    timings = jsonb_build_object(
        {_QUEUED_MS},
        'inference_ms', CAST(:inference_ms AS bigint),
        'upload_ms', CAST(:upload_ms AS bigint),
        {_TOTAL_MS}),
    {_ENDED}
WHERE id = :id AND attempt = :attempt AND status IN ({_in(JobStatus.SUCCEEDED)})
RETURNING id
"""
)


def record_success(
    conn: Connection,
    job: ClaimedJob,
    *,
    outputs: list[dict[str, Any]],
    inference_ms: int,
    upload_ms: int,
) -> bool:
    """Mark a claimed job succeeded with its outputs (fenced); False when the write was stale and did nothing."""
    done = conn.execute(
        _SUCCEED,
        {
            "id": job.id,
            "attempt": job.attempt,
            "outputs": json.dumps(outputs),
            "inference_ms": inference_ms,
            "upload_ms": upload_ms,
        },
    ).scalar()
    conn.commit()
    if done is None:
        # A retry after a commit whose answer was lost finds its own success: that is not a stale write.
        if _ended_as(conn, job, JobStatus.SUCCEEDED):
            return True
        log.info("stale success write ignored: job %s attempt %s", job.id, job.attempt)
    return done is not None


def _ended_as(conn: Connection, job: ClaimedJob, status: JobStatus) -> bool:
    """Whether the job already ended in ``status`` under this very attempt."""
    found = conn.execute(
        text("SELECT 1 FROM jobs WHERE id = :id AND attempt = :attempt AND status = :status"),
        {"id": job.id, "attempt": job.attempt, "status": status.value},
    ).scalar()
    conn.commit()
    return found is not None


_FAIL = text(
    f"""
UPDATE jobs SET
    status = '{JobStatus.FAILED}',
    error_code = :code,
    error_message = :message,
    timings = jsonb_build_object({_QUEUED_MS}, {_TOTAL_MS}),
    {_ENDED}
WHERE id = :id AND attempt = :attempt AND status IN ('{JobStatus.RUNNING}')
RETURNING id
"""
)


def record_failure(conn: Connection, job: ClaimedJob, *, code: ErrorCode, message: str) -> bool:
    """Mark a claimed job failed with an error code (fenced); False when the write was stale."""
    done = conn.execute(
        _FAIL, {"id": job.id, "attempt": job.attempt, "code": code.value, "message": message[:2000]}
    ).scalar()
    conn.commit()
    return done is not None or _ended_as(conn, job, JobStatus.FAILED)


_RELEASE = text(
    f"""
UPDATE jobs SET status = '{JobStatus.QUEUED}', lease_expires_at = NULL, worker_id = NULL,
                progress_step = NULL, progress_total = NULL, dispatched_at = NULL,
                updated_at = clock_timestamp()
WHERE id = :id AND attempt = :attempt AND status = '{JobStatus.RUNNING}'
RETURNING id
"""
)


def release(conn: Connection, job: ClaimedJob) -> bool:
    """Give a claimed job back to the queue (shutdown, transient error); the sweeper re-publishes it."""
    done = conn.execute(_RELEASE, {"id": job.id, "attempt": job.attempt}).scalar()
    conn.commit()
    return done is not None
