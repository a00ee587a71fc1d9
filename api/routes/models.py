"""``/v1/models``: the Z-Image models this deployment serves, their defaults and limits, and whether a worker
for each is up."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import ResourcesDep, TenantDep
from core import catalog
from core.schemas import ErrorBody

router = APIRouter(prefix="/v1/models", tags=["models"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 429, 503)}

# The queues of the workers that are ready and were seen lately (each marks its row every worker_heartbeat_s).
_LIVE_QUEUES = text(
    "SELECT DISTINCT queues FROM workers WHERE ready AND last_seen_at > now() - make_interval(secs => :stale_s)"
)


@router.get("", responses=_ERRORS)
async def list_models(res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Each served model (its weights are named in the settings) with its defaults and limits; ``available``
    while a ready worker of its queue is alive. A job for a served model that is not available is accepted and
    waits in its queue until a worker comes."""
    del tenant  # any tenant may read the list; the dependency authenticates
    async with res.db.connect() as conn:
        rows = (await conn.execute(_LIVE_QUEUES, {"stale_s": 3 * res.settings.worker_heartbeat_s})).scalars()
        live = {queue for queues in rows for queue in queues.split(",") if queue}
    data = [{**spec.describe(), "available": spec.queue in live} for spec in catalog.served(res.settings)]
    return {"object": "list", "data": data}
