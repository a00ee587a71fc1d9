"""The job object of API.md, built from a ``jobs`` row (presigned URLs are made when it is read)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from core.status import JobStatus

Presigner = Callable[[str], tuple[str, datetime]]


def rfc3339(value: datetime | None) -> str | None:
    """A timestamp as an RFC 3339 UTC string with milliseconds (``2026-11-26T06:16:57.123Z``)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Every column ``job_object`` reads: a caller may fetch only these (the group commit does, for the 202 of each row).
COLUMNS = (
    "id", "status", "kind", "request", "batch_id", "priority", "attempt", "progress_step", "progress_total",
    "error_code", "error_message", "outputs", "timings", "created_at", "started_at", "finished_at", "metadata",
    "reused_from",
)  # fmt: skip


def job_object(
    row: Mapping[str, Any], *, presign: Presigner, queue_position: int | None = None
) -> dict[str, Any]:
    """The API's view of a job row."""
    status = row["status"]
    progress = None
    if status == JobStatus.RUNNING and row["progress_total"]:
        progress = {"step": row["progress_step"] or 0, "total": row["progress_total"]}
    error = None
    if status == JobStatus.FAILED:
        error = {"code": row["error_code"] or "internal_error", "message": row["error_message"] or ""}
    outputs = []
    if status == JobStatus.SUCCEEDED:
        for out in row["outputs"]:
            url, expires = presign(out["key"])
            outputs.append({**out, "url": url, "url_expires_at": rfc3339(expires)})
    return {
        "id": row["id"],
        "object": "job",
        "status": status,
        "kind": row["kind"],
        "request": row["request"],
        "batch_id": row["batch_id"],
        "priority": row["priority"],
        "attempts": row["attempt"],
        "progress": progress,
        "queue_position": queue_position if status == JobStatus.QUEUED else None,
        "error": error,
        "outputs": outputs,
        "timings": row["timings"] or {},
        "created_at": rfc3339(row["created_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "metadata": row["metadata"],
        "reused_from": row["reused_from"],
    }
