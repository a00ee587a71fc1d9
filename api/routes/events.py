"""``/v1/jobs/{id}/events`` and ``/v1/batches/{id}/events``: server-sent events until the job or batch is done."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

from api import batches as batch_ops
from api import jobs as job_ops
from api.deps import ResourcesDep, TenantDep
from api.events import batch_stream, job_stream
from core import errors
from core.models import jobs
from core.schemas import ErrorBody

router = APIRouter(tags=["events"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 503)}
_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}
}
# Proxies must pass each event on at once, and nothing may cache a live stream.
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]


def _resume_from(value: str | None) -> int | None:
    """The event id a reconnecting client last saw (ids are integers; anything else starts afresh)."""
    return int(value) if value is not None and value.strip().isdigit() else None


@router.get("/v1/jobs/{job_id}/events", responses={**_ERRORS, **_STREAM})
async def job_events(
    job_id: str, res: ResourcesDep, tenant: TenantDep, last_event_id: LastEventId = None
) -> StreamingResponse:
    """The job's events until it is terminal: ``job`` (the whole object) on every status change, ``progress``
    between; a keep-alive comment every 15 s; ``Last-Event-ID`` resumes."""

    async def read() -> Any:
        async with res.db.connect() as conn:
            query = select(jobs).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant)
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"no job {job_id!r}")
        return row

    async def render(row: Any) -> dict[str, Any]:
        async with res.db.connect() as conn:
            return await job_ops.render(conn, res, row)

    await read()  # a 404 before the stream starts
    stream = job_stream(res, job_id=job_id, last_event_id=_resume_from(last_event_id), read=read, render=render)
    return StreamingResponse(stream, media_type="text/event-stream", headers=_HEADERS)


@router.get("/v1/batches/{batch_id}/events", responses={**_ERRORS, **_STREAM})
async def batch_events(
    batch_id: str, res: ResourcesDep, tenant: TenantDep, last_event_id: LastEventId = None
) -> StreamingResponse:
    """The batch's ``batch`` events (the batch object with its counts) until it is no longer running."""

    async def read() -> tuple[dict[str, Any], Any]:
        view = await batch_ops.get_batch(res, tenant_id=tenant, batch_id=batch_id)
        async with res.db.connect() as conn:
            newest = await conn.scalar(select(func.max(jobs.c.updated_at)).where(jobs.c.batch_id == batch_id))
        return view, newest

    await read()  # a 404 before the stream starts
    stream = batch_stream(res, batch_id=batch_id, last_event_id=_resume_from(last_event_id), read=read)
    return StreamingResponse(stream, media_type="text/event-stream", headers=_HEADERS)
