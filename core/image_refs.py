"""Submit-time checks of a job's image references: uploads exist for the tenant, and a mask fits its image.

Runs before a job row is written, so a bad reference is a 422 and no job. Another tenant's upload id is
reported exactly like an unknown one. URL references get only the checks that need no network (scheme,
credentials, literal private addresses: ``core.fetch.precheck_url``); the worker fetches them, and checks
a URL mask against its image once both are decoded.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import ValidationFailed
from core.fetch import precheck_url
from core.models import uploads
from core.schemas import ImageRef, JobRequest

_IDS_PER_QUERY = 5000  # well under Postgres' 65535 bind parameters per statement


async def check_refs(
    conn: AsyncConnection, tenant_id: str, req: JobRequest, *, allow_hosts: Collection[str] = ()
) -> None:
    """Raise ValidationFailed listing every bad image reference of one job request."""
    problems = await ref_problems(conn, tenant_id, [req], allow_hosts=allow_hosts)
    if problems:
        raise ValidationFailed(_summary(problems), problems)


async def check_batch_refs(
    conn: AsyncConnection, tenant_id: str, reqs: Sequence[JobRequest], *, allow_hosts: Collection[str] = ()
) -> None:
    """Raise ValidationFailed listing every bad image reference of a batch, each with its job ``index``."""
    problems = await ref_problems(conn, tenant_id, reqs, allow_hosts=allow_hosts, indexed=True)
    if problems:
        raise ValidationFailed(_summary(problems), problems)


async def ref_problems(
    conn: AsyncConnection,
    tenant_id: str,
    reqs: Sequence[JobRequest],
    *,
    allow_hosts: Collection[str] = (),
    indexed: bool = False,
) -> list[dict[str, Any]]:
    """Every problem with the image references of ``reqs`` as ``{"field", "message"[, "index"]}``."""
    wanted = {ref.upload_id for req in reqs for _, ref in _refs(req) if ref.upload_id is not None}
    sizes = await _upload_sizes(conn, tenant_id, wanted)
    problems: list[dict[str, Any]] = []
    for index, req in enumerate(reqs):
        found: list[dict[str, Any]] = []
        for path, ref in _refs(req):
            if ref.upload_id is not None:
                if ref.upload_id not in sizes:
                    found.append({"field": f"{path}.upload_id", "message": "no such upload for this tenant"})
            elif ref.url is not None:
                try:
                    precheck_url(str(ref.url), field=f"{path}.url", allow_hosts=allow_hosts)
                except ValidationFailed as exc:
                    found.extend(exc.details)
        found.extend(_mask_mismatch(req, sizes))
        for item in found:
            problems.append({**item, "index": index} if indexed else item)
    return problems


def _refs(req: JobRequest) -> Iterator[tuple[str, ImageRef]]:
    """Each image reference of a request with its field path."""
    for position, ref in enumerate(req.input_images):
        yield f"input_images.{position}", ref
    if req.mask is not None:
        yield "mask", req.mask


def _mask_mismatch(req: JobRequest, sizes: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """The problem of a mask whose size differs from its image's, when both are known uploads."""
    if req.mask is None or not req.input_images:
        return []
    mask_id, image_id = req.mask.upload_id, req.input_images[0].upload_id
    if mask_id not in sizes or image_id not in sizes:
        return []  # unknown ids are reported already; URL sizes are known only to the worker
    (mw, mh), (iw, ih) = sizes[mask_id], sizes[image_id]
    if (mw, mh) == (iw, ih):
        return []
    message = f"the mask is {mw}x{mh} but its image (input_images.0) is {iw}x{ih}; they must match"
    return [{"field": "mask", "message": message}]


async def _upload_sizes(conn: AsyncConnection, tenant_id: str, ids: set[str]) -> dict[str, tuple[int, int]]:
    """Width and height of each of ``ids`` that is an upload of this tenant (displayed size)."""
    sizes: dict[str, tuple[int, int]] = {}
    ordered = sorted(ids)
    for start in range(0, len(ordered), _IDS_PER_QUERY):
        chunk = ordered[start : start + _IDS_PER_QUERY]
        query = select(uploads.c.id, uploads.c.width, uploads.c.height).where(
            uploads.c.tenant_id == tenant_id, uploads.c.id.in_(chunk)
        )
        for row in await conn.execute(query):
            sizes[row.id] = (row.width, row.height)
    return sizes


def _summary(problems: list[dict[str, Any]]) -> str:
    fields = ", ".join(dict.fromkeys(p["field"] for p in problems))
    return f"invalid image reference: {fields}"
