"""The batch object of API.md, built from a ``batches`` row and its jobs' counts (the API and webhooks share it)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select

from core.job_object import rfc3339
from core.links import gallery_url
from core.models import jobs
from core.settings import Settings
from core.status import JobStatus


def counts_query(batch_id: str) -> Select[Any]:
    """The batch's jobs counted by status, with the last ``finished_at`` of each (one grouped query)."""
    return (
        select(jobs.c.status, func.count(), func.max(jobs.c.finished_at))
        .where(jobs.c.batch_id == batch_id)
        .group_by(jobs.c.status)
    )


def tally(rows: Iterable[Any]) -> tuple[dict[str, int], datetime | None]:
    """The counts by status and the last finish time, from the rows of ``counts_query``."""
    counts: dict[str, int] = {}
    finished = None
    for status, count, last in rows:
        counts[status] = int(count)
        if last is not None and (finished is None or last > finished):
            finished = last
    return counts, finished


def batch_object(
    settings: Settings, row: Any, counts: dict[str, int], *, finished_at: datetime | None
) -> dict[str, Any]:
    """The API's view of a batch: its counts by status, and its status derived from them."""
    full = {status.value: counts.get(status.value, 0) for status in JobStatus}
    active = full[JobStatus.QUEUED] + full[JobStatus.RUNNING]
    status = "canceled" if row["status"] == "canceled" else "running" if active else "completed"
    return {
        "id": row["id"],
        "object": "batch",
        "status": status,
        "counts": {"total": row["total"], **full},
        "created_at": rfc3339(row["created_at"]),
        "finished_at": rfc3339(finished_at) if not active and finished_at is not None else None,
        "metadata": row["metadata"],
        # A fresh signed link a browser can open without the API key (short-lived; see core/links.py).
        "gallery_url": gallery_url(settings, row["tenant_id"], row["id"]),
    }
