"""``/v1/jobs``: submit, read, list and cancel jobs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response

from api import jobs as job_ops
from api.deps import ResourcesDep, TenantDep
from api.resources import Resources
from api.submit import submit_job
from core import catalog, errors, fastjson
from core.image_refs import check_refs
from core.schemas import ErrorBody, JobObject, JobPage, JobRequest
from core.webhook_urls import check_webhook_url

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 429, 503)
}
StatusFilter = Literal["queued", "running", "succeeded", "failed", "canceled"]


@router.post(
    "",
    status_code=202,
    response_model=JobObject,
    responses={**_ERRORS, 200: {"model": JobObject, "description": "the original job of a repeated Idempotency-Key"}},
)
async def create_job(
    req: JobRequest,
    res: ResourcesDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Submit a job; answers 202 at once with the queued job (200 with the original for a repeated key)."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise errors.ValidationFailed(
            "Idempotency-Key must be 1 to 255 characters",
            [{"field": "Idempotency-Key", "message": "must be 1 to 255 characters"}],
        )
    return await accept_job(res, tenant, req, idempotency_key)


async def accept_job(res: Resources, tenant: str, req: JobRequest, idempotency_key: str | None) -> Response:
    """Check what the request model cannot, submit, and answer: the submit route's work once its inputs are read
    (also called by ``api.fast_submit``, which reads them without FastAPI)."""
    if req.mode == "instruct" and res.settings.edit_model is None:
        raise errors.ValidationFailed(
            "instruct edits need an Edit checkpoint, and this service has none configured",
            [{"field": "mode", "message": "instruct edits are not available here; use img2img or inpaint"}],
        )
    unserved = catalog.unserved(res.settings, req.model)
    if unserved is not None:
        raise errors.ValidationFailed(unserved, [{"field": "model", "message": unserved}])
    if req.webhook_url is not None:  # https and a public address (SSRF), checked before anything is written
        await check_webhook_url(str(req.webhook_url), res.settings)
    if req.kind == "edit":
        async with res.db.connect() as conn:
            await check_refs(conn, tenant, req, allow_hosts=res.settings.fetch_allow_hosts)
    job, created = await submit_job(res, tenant_id=tenant, req=req, idempotency_key=idempotency_key)
    # A Response of our own JSON skips FastAPI's re-validation of the job object: the hot path of bulk submission.
    return Response(
        fastjson.dumps(job),
        status_code=202 if created else 200,
        headers={"Location": f"/v1/jobs/{job['id']}"},
        media_type="application/json",
    )


@router.get("", response_model=JobPage, responses=_ERRORS)
async def list_jobs(
    res: ResourcesDep,
    tenant: TenantDep,
    status: StatusFilter | None = None,
    batch_id: Annotated[str | None, Query(pattern=r"^[^\x00]*$")] = None,  # Postgres cannot compare a NUL
    limit: Annotated[int, Query(ge=1, le=job_ops.MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(pattern=job_ops.CURSOR_PATTERN)] = None,
) -> dict[str, Any]:
    """The tenant's jobs, newest first, a page at a time."""
    return await job_ops.list_jobs(
        res, tenant_id=tenant, status=status, batch_id=batch_id, limit=limit, cursor=cursor
    )


@router.get("/{job_id}", response_model=JobObject, responses=_ERRORS)
async def get_job(job_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """One job."""
    return await job_ops.get_job(res, tenant_id=tenant, job_id=job_id)


@router.post("/{job_id}/cancel", response_model=JobObject, responses=_ERRORS)
async def cancel_job(job_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel a job that is not yet terminal."""
    return await job_ops.cancel_job(res, tenant_id=tenant, job_id=job_id)
