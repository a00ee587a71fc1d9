"""``GET /metrics``: this API process's Prometheus metrics, and the queue figures read from Postgres."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.deps import ResourcesDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(res: ResourcesDep) -> Response:
    """Prometheus text exposition; no API key (like /healthz: keep it off the public load balancer)."""
    if res.queue_stats is not None:
        await res.queue_stats.refresh(res.db)  # at most one query per refresh interval, however many scrapes
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
