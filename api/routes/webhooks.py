"""``GET /v1/jobs/{job_id}/webhooks`` and ``GET /v1/batches/{batch_id}/webhooks``: webhook deliveries and attempts."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from api import webhooks as webhook_ops
from api.deps import ResourcesDep, TenantDep
from core.schemas import ErrorBody

router = APIRouter(tags=["webhooks"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 503)}


class WebhookAttempt(BaseModel):
    """One try: when it started, the HTTP status (or the error: a timeout, a refused address), how long it took."""

    attempt: int
    started_at: str
    status_code: int | None
    error: str | None
    latency_ms: int


class WebhookDelivery(BaseModel):
    """A webhook owed for a job or batch: where it goes, where it stands, its next try and every attempt."""

    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    url: str
    status: Literal["pending", "delivering", "succeeded", "failed"]
    created_at: str
    delivered_at: str | None
    next_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    attempts: list[WebhookAttempt]


class WebhookDeliveryList(BaseModel):
    """The deliveries of one job or batch, oldest first."""

    data: list[WebhookDelivery]


@router.get("/v1/jobs/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=_ERRORS)
async def job_webhooks(job_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """The job's webhook deliveries and their attempts."""
    return await webhook_ops.list_deliveries(res, tenant_id=tenant, job_id=job_id)


@router.get("/v1/batches/{batch_id}/webhooks", response_model=WebhookDeliveryList, responses=_ERRORS)
async def batch_webhooks(batch_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """The batch's webhook delivery (sent when it completes or is canceled) and its attempts."""
    return await webhook_ops.list_deliveries(res, tenant_id=tenant, batch_id=batch_id)
