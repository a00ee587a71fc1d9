"""Submit-time check of the adapters jobs name: every ``loras[].adapter_id`` is an adapter of the tenant.

One query for a job or a whole batch, and none at all when no job names an adapter (the plain submit path pays
nothing). Another tenant's adapter id is reported exactly like an unknown one. An adapter deleted after the check
fails its jobs at the worker (``invalid_input``); a delete is refused while queued or running jobs name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import ValidationFailed
from core.schemas import JobRequest

# = ANY of one array parameter: one statement whatever the number of ids (a batch may name thousands).
_OWNED = text("SELECT id FROM adapters WHERE tenant_id = :tenant AND id = ANY(:ids)")


async def adapter_problems(
    conn: AsyncConnection, tenant_id: str, reqs: Sequence[JobRequest], *, indexed: bool = False
) -> list[dict[str, Any]]:
    """Every adapter of ``reqs`` that is not the tenant's, as ``{"field": "loras.N.adapter_id", "message"[,
    "index"]}`` (N: its place in the job's list as sent)."""
    wanted = sorted({lora.adapter_id for req in reqs for lora in req.loras})
    if not wanted:
        return []
    found = {row[0] for row in await conn.execute(_OWNED, {"tenant": tenant_id, "ids": wanted})}
    problems: list[dict[str, Any]] = []
    for index, req in enumerate(reqs):
        for position, lora in enumerate(req.loras):
            if lora.adapter_id not in found:
                item: dict[str, Any] = {
                    "field": f"loras.{position}.adapter_id",
                    "message": "no such adapter for this tenant",
                }
                problems.append({**item, "index": index} if indexed else item)
    return problems


async def check_adapters(conn: AsyncConnection, tenant_id: str, req: JobRequest) -> None:
    """Raise ValidationFailed naming every adapter of one job request that is not the tenant's."""
    problems = await adapter_problems(conn, tenant_id, [req])
    if problems:
        fields = ", ".join(p["field"] for p in problems)
        raise ValidationFailed(f"invalid adapter reference: {fields}", problems)
