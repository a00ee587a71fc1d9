"""``/v1/batches``: submit thousands of jobs at once, read a batch, list its jobs, cancel it, stream its manifest."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from api import batches as batch_ops
from api import jobs as job_ops
from api.deps import ResourcesDep, TenantDep
from api.routes.jobs import StatusFilter
from core import errors
from core.batch_request import parse_batch
from core.schemas import ErrorBody, JobPage

router = APIRouter(prefix="/v1/batches", tags=["batches"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 429, 503)
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["jobs"],
                    "properties": {
                        "defaults": {"type": "object", "description": "fields every job gets unless it sets them"},
                        "jobs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"$ref": "#/components/schemas/JobRequest"},
                        },
                        "metadata": {"type": "object"},
                    },
                }
            },
            "application/x-ndjson": {"schema": {"type": "string", "description": "one job request per line"}},
        },
    }
}


class BatchCounts(BaseModel):
    """How many of a batch's jobs are in each status."""

    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class BatchObject(BaseModel):
    """A batch: its counts by status; ``running`` until every job is terminal, then ``completed``."""

    id: str
    object: Literal["batch"] = "batch"
    status: Literal["running", "completed", "canceled"]
    counts: BatchCounts
    created_at: str
    finished_at: str | None
    metadata: dict[str, Any]
    gallery_url: str  # the batch's gallery with a short-lived signed token, for a browser


@router.post(
    "",
    status_code=202,
    response_model=BatchObject,
    responses={**_ERRORS, 200: {"model": BatchObject, "description": "the original of a repeated Idempotency-Key"}},
    openapi_extra=_BATCH_BODY,
)
async def create_batch(
    request: Request,
    res: ResourcesDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Submit up to 10 000 jobs as one batch, all or nothing; 202 with the batch (200 for a repeated key)."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise errors.ValidationFailed(
            "Idempotency-Key must be 1 to 255 characters",
            [{"field": "Idempotency-Key", "message": "must be 1 to 255 characters"}],
        )
    body = await request.body()
    submission = parse_batch(
        body, request.headers.get("content-type", ""), max_jobs=res.settings.max_batch_jobs
    )
    batch, created = await batch_ops.create_batch(
        res, tenant_id=tenant, submission=submission, body=body, idempotency_key=idempotency_key
    )
    return JSONResponse(
        batch, status_code=202 if created else 200, headers={"Location": f"/v1/batches/{batch['id']}"}
    )


@router.get("/{batch_id}", response_model=BatchObject, responses=_ERRORS)
async def get_batch(batch_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """One batch with its counts by status."""
    return await batch_ops.get_batch(res, tenant_id=tenant, batch_id=batch_id)


@router.get("/{batch_id}/jobs", response_model=JobPage, responses=_ERRORS)
async def list_batch_jobs(
    batch_id: str,
    res: ResourcesDep,
    tenant: TenantDep,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=job_ops.MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(pattern=job_ops.CURSOR_PATTERN)] = None,
) -> dict[str, Any]:
    """The batch's jobs, newest first, a page at a time."""
    return await batch_ops.list_batch_jobs(
        res, tenant_id=tenant, batch_id=batch_id, status=status, limit=limit, cursor=cursor
    )


@router.post("/{batch_id}/cancel", response_model=BatchObject, responses=_ERRORS)
async def cancel_batch(batch_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel every job of the batch that is not yet terminal."""
    return await batch_ops.cancel_batch(res, tenant_id=tenant, batch_id=batch_id)


@router.get(
    "/{batch_id}/manifest",
    responses={**_ERRORS, 200: {"content": {"application/x-ndjson": {}}, "description": "one line per job"}},
)
async def get_manifest(batch_id: str, res: ResourcesDep, tenant: TenantDep) -> StreamingResponse:
    """The batch as NDJSON, one line per job in submission order, with fresh presigned URLs (streamed)."""
    lines = batch_ops.manifest_lines(res, tenant_id=tenant, batch_id=batch_id)
    first = await anext(lines, b"")  # a 404 is raised here, before the 200 starts
    return StreamingResponse(_chain(first, lines), media_type="application/x-ndjson")


async def _chain(first: bytes, rest: Any) -> Any:
    yield first
    async for chunk in rest:
        yield chunk
