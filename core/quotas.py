"""Per-tenant quotas, decided by Postgres inside the submit transaction: open (queued + running) jobs, jobs per
batch, and images submitted per UTC day. Each limit is the tenant's own (``zimage-admin set-limits``) or else the
setting's; 0 means no limit.

``charge`` counts a submission against the tenant's ``tenant_usage`` row, which it locks: one tenant's concurrent
submits (group commits, batches) are decided one after another, so a quota is never overshot. Counting the
tenant's open jobs on every submit would cost a scan of up to the whole quota; instead the row keeps the last
count and the jobs submitted since, whose sum bounds the open jobs from above (jobs leave the open states, never
come back to them). Only when that bound would refuse the submission are the open jobs counted again (at most
once a second per tenant, and never more than the quota's worth of index entries). So most submits cost one
UPDATE, and none is refused while it fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row

from core import errors
from core.settings import Settings

# Refused on the open-jobs bound: wait this long before trying again (workers need time to finish jobs).
QUEUED_RETRY_AFTER_S = 5
_RECOUNT_EVERY_S = 1.0

# Every statement runs on the driver (psycopg's connection, its parameter style), prepared: the common UPDATE runs
# once per tenant per group commit, and SQLAlchemy's work per call was a twentieth of the API's CPU under a bulk
# load. Callers holding a SQLAlchemy connection pass ``core.db.driver_connection(conn)``.

# Fits whatever the limits: one UPDATE, no count; it returns the tenant's row when it counted the jobs (a group
# commit of one tenant runs it inside its insert).
FAST_CHARGE = """
UPDATE tenant_usage u SET
  images = CASE WHEN u.day = %(today)s THEN u.images ELSE 0 END + %(images)s,
  day = %(today)s,
  submitted = u.submitted + %(jobs)s
FROM tenants t
WHERE u.tenant_id = %(tenant)s AND t.id = u.tenant_id
  AND (coalesce(t.max_images_per_day, %(d_images)s) = 0
       OR CASE WHEN u.day = %(today)s THEN u.images ELSE 0 END + %(images)s
          <= coalesce(t.max_images_per_day, %(d_images)s))
  AND (coalesce(t.max_queued_jobs, %(d_queued)s) = 0
       OR (u.checked_at IS NOT NULL
           AND u.open_at_check + u.submitted - u.submitted_at_check + %(jobs)s
               <= coalesce(t.max_queued_jobs, %(d_queued)s)))
  AND (NOT %(batch)s OR coalesce(t.max_batch_jobs, 0) = 0 OR %(jobs)s <= t.max_batch_jobs)
RETURNING u.tenant_id
"""

# The slow path: lock (or create) the row, start a new day, and read what the decision needs.
_LOCK = """
WITH u AS (
  INSERT INTO tenant_usage AS u (tenant_id, day) VALUES (%(tenant)s, %(today)s)
  ON CONFLICT (tenant_id) DO UPDATE
    SET images = CASE WHEN u.day = excluded.day THEN u.images ELSE 0 END, day = excluded.day
  RETURNING u.*)
SELECT u.images, u.submitted, u.open_at_check, u.submitted_at_check,
       u.checked_at IS NULL AS never_counted,
       u.checked_at IS NOT NULL AND u.checked_at > clock_timestamp() - make_interval(secs => %(recount_s)s) AS fresh,
       coalesce(t.max_queued_jobs, %(d_queued)s) AS max_queued,
       coalesce(t.max_images_per_day, %(d_images)s) AS max_images,
       coalesce(t.max_batch_jobs, 0) AS max_batch
FROM u JOIN tenants t ON t.id = u.tenant_id
"""

# At most ``cap`` index entries of the tenant's open jobs (ix_jobs_tenant_status).
_COUNT_OPEN = """
SELECT count(*) FROM (
  SELECT 1 FROM jobs WHERE tenant_id = %(tenant)s AND status IN ('queued', 'running') LIMIT %(cap)s) open_jobs
"""

_RECORD = """
UPDATE tenant_usage SET images = images + %(images)s, submitted = submitted + %(jobs)s,
  open_at_check = %(open_at_check)s, submitted_at_check = %(submitted_at_check)s,
  checked_at = CASE WHEN %(recounted)s THEN clock_timestamp() ELSE checked_at END
WHERE tenant_id = %(tenant)s
"""


@dataclass(frozen=True)
class Defaults:
    """The settings' limits, for tenants without their own (0: no limit)."""

    max_queued_jobs: int
    max_images_per_day: int

    @classmethod
    def of(cls, settings: Settings) -> Defaults:
        """The defaults ``settings`` name."""
        return cls(settings.max_queued_jobs, settings.max_images_per_day)


def seconds_to_midnight(now: datetime | None = None) -> int:
    """Whole seconds until the next UTC day begins (when a daily quota resets), at least 1."""
    now = now or datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return max(1, int((midnight - now).total_seconds()) + 1)


@dataclass(frozen=True)
class Admission:
    """How many of the submitted jobs fit (the first ones), and the refusal of the rest (None: all fit)."""

    admitted: int
    refusal: errors.RateLimited | None = None


async def charge(
    conn: psycopg.AsyncConnection, tenant_id: str, images: Sequence[int], defaults: Defaults, *, batch: bool = False
) -> Admission:
    """Count jobs (``images``: each one's image count, in submission order) against the tenant's quotas in the
    caller's transaction: the first jobs that fit are admitted, the rest refused (429 ``rate_limited``, with
    its ``reason`` and ``retry_after_s``). A batch (``batch``) fits whole or not at all. The count is undone if
    the caller rolls back, and holds the tenant's row until it commits or rolls back.

    Raises ``PayloadTooLarge`` for a batch over the tenant's own ``max_batch_jobs``.
    """
    if not images:
        return Admission(0)
    if await fits(conn, tenant_id, images, defaults, batch=batch):
        return Admission(len(images))
    return await _decide(conn, tenant_id, images, defaults, datetime.now(UTC).date(), batch=batch)


def fast_params(
    tenant_id: str, images: Sequence[int], defaults: Defaults, *, batch: bool = False
) -> dict[str, Any]:
    """The parameters of ``FAST_CHARGE`` for these jobs (each one's image count)."""
    return {
        "tenant": tenant_id,
        "today": datetime.now(UTC).date(),
        "images": sum(images),
        "jobs": len(images),
        "batch": batch,
        "d_images": defaults.max_images_per_day,
        "d_queued": defaults.max_queued_jobs,
    }


async def fits(
    conn: psycopg.AsyncConnection, tenant_id: str, images: Sequence[int], defaults: Defaults, *, batch: bool = False
) -> bool:
    """``charge``'s common case alone, one UPDATE: True when every job fits and was counted; False when that
    cannot be told without more (a quota in the way, the tenant's first submit), and nothing was counted."""
    async with conn.cursor() as cursor:
        await cursor.execute(FAST_CHARGE, fast_params(tenant_id, images, defaults, batch=batch), prepare=True)
        return await cursor.fetchone() is not None


async def _decide(
    conn: psycopg.AsyncConnection,
    tenant_id: str,
    images: Sequence[int],
    defaults: Defaults,
    today: date,
    *,
    batch: bool,
) -> Admission:
    """The slow path of ``charge``: lock the row, count the open jobs if the bound is in the way, then admit."""
    params = {
        "tenant": tenant_id,
        "today": today,
        "recount_s": _RECOUNT_EVERY_S,
        "d_queued": defaults.max_queued_jobs,
        "d_images": defaults.max_images_per_day,
    }
    async with conn.cursor(row_factory=namedtuple_row) as cursor:
        await cursor.execute(_LOCK, params, prepare=True)
        row: Any = await cursor.fetchone()
    assert row is not None
    if batch and row.max_batch and len(images) > row.max_batch:
        raise errors.PayloadTooLarge(
            f"a batch of {len(images)} jobs is over this tenant's limit of {row.max_batch}",
            [{"field": "jobs", "message": f"at most {row.max_batch} jobs per batch for this tenant"}],
        )
    open_at_check, submitted_at_check = row.open_at_check, row.submitted_at_check
    bound = open_at_check + row.submitted - submitted_at_check
    recounted = False
    # Counted when the bound is unknown (a new row) or would refuse (and was not counted a moment ago).
    if row.max_queued and (row.never_counted or (bound + len(images) > row.max_queued and not row.fresh)):
        counted = await (await conn.execute(_COUNT_OPEN, {"tenant": tenant_id, "cap": row.max_queued})).fetchone()
        open_at_check = int(counted[0]) if counted else 0
        submitted_at_check, bound, recounted = row.submitted, open_at_check, True
    admitted, used = 0, row.images
    for n in images:
        if row.max_queued and bound + admitted + 1 > row.max_queued:
            reason = "max_queued_jobs"
            break
        if row.max_images and used + n > row.max_images:
            reason = "max_images_per_day"
            break
        admitted, used = admitted + 1, used + n
    else:
        reason = ""
    if reason and batch:
        admitted, used = 0, row.images
    await _record(conn, tenant_id, used - row.images, admitted, open_at_check, submitted_at_check, recounted)
    return Admission(admitted, _refusal(reason, row) if reason else None)


async def _record(
    conn: psycopg.AsyncConnection,
    tenant_id: str,
    images: int,
    jobs: int,
    open_at_check: int,
    submitted_at_check: int,
    recounted: bool,
) -> None:
    """Write what was admitted, and the new count when there was one."""
    if jobs or recounted:
        await conn.execute(
            _RECORD,
            {
                "tenant": tenant_id,
                "images": images,
                "jobs": jobs,
                "open_at_check": open_at_check,
                "submitted_at_check": submitted_at_check,
                "recounted": recounted,
            },
            prepare=True,
        )


def _refusal(reason: str, row: Any) -> errors.RateLimited:
    """The 429 for a quota the submission does not fit."""
    if reason == "max_images_per_day":
        message = f"this tenant's quota of {row.max_images} images per day (UTC) is used up"
        return errors.RateLimited(message, seconds_to_midnight(), reason=reason)
    message = f"this tenant has its quota of {row.max_queued} queued and running jobs; wait for some to finish"
    return errors.RateLimited(message, QUEUED_RETRY_AFTER_S, reason=reason)
