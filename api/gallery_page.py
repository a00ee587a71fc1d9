"""What a batch's gallery shows: one page of the batch's jobs, in submission order, with fresh presigned URLs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select

from api.batches import batch_object
from api.resources import Resources
from core import errors
from core.job_object import job_object
from core.models import batches, jobs
from core.status import JobStatus

PAGE_SIZE = 60
# The order the page counts statuses in: the ones still moving first.
STATUS_ORDER = ("queued", "running", "succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Tile:
    """One job of the batch as the gallery shows it."""

    index: int
    job_id: str
    status: str
    prompt: str
    seed: int | None
    width: int
    height: int
    images: list[dict[str, Any]]  # the job object's outputs: url, width, height, seed, …
    error: dict[str, str] | None
    progress: dict[str, int] | None
    metadata: dict[str, Any]
    loras: list[dict[str, Any]] = field(default_factory=list)  # the adapters it ran with: adapter_id, scale


@dataclass(frozen=True)
class GalleryPage:
    """One page of a batch: the batch, how many of its jobs are in each status, and this page's tiles."""

    batch_id: str
    batch_status: str  # as the batch object says it: running, completed or canceled
    metadata: dict[str, Any]
    counts: dict[str, int]
    page: int
    pages: int
    tiles: list[Tile]

    @property
    def total(self) -> int:
        """How many jobs the batch holds."""
        return sum(self.counts.values())

    @property
    def active(self) -> bool:
        """Whether any job of the batch (on any page) is still queued or running."""
        return bool(self.counts.get(JobStatus.QUEUED.value) or self.counts.get(JobStatus.RUNNING.value))

    @property
    def image_origins(self) -> list[str]:
        """The origins (scheme://host[:port]) of this page's image URLs, sorted."""
        origins = set()
        for tile in self.tiles:
            for image in tile.images:
                parts = urlsplit(image["url"])
                origins.add(f"{parts.scheme}://{parts.netloc}")
        return sorted(origins)


def _tile(row: Any, res: Resources) -> Tile:
    job = job_object(row, presign=res.presign)  # the JSON API's reading of a row: one rule for both
    request = job["request"]
    return Tile(
        index=row["batch_index"] if row["batch_index"] is not None else -1,
        job_id=job["id"],
        status=job["status"],
        prompt=str(request.get("prompt") or ""),
        seed=request.get("seed"),
        width=int(request.get("width") or 1),
        height=int(request.get("height") or 1),
        images=job["outputs"],
        error=job["error"],
        progress=job["progress"],
        metadata=job["metadata"] or {},
        loras=list(request.get("loras") or []),
    )


async def read_gallery_page(res: Resources, *, tenant_id: str, batch_id: str, page: int) -> GalleryPage:
    """Page ``page`` (from 1) of the tenant's batch; NotFound for another tenant's batch, an unknown one, or a
    page past the last."""
    async with res.db.connect() as conn:
        batch = (
            (await conn.execute(select(batches).where(batches.c.id == batch_id, batches.c.tenant_id == tenant_id)))
            .mappings()
            .first()
        )
        if batch is None:
            raise errors.NotFound(f"no batch {batch_id!r}")
        # The tenant is repeated on every job read: a batch row can never lend its jobs to another tenant.
        mine = (jobs.c.batch_id == batch_id, jobs.c.tenant_id == tenant_id)
        counted = await conn.execute(select(jobs.c.status, func.count()).where(*mine).group_by(jobs.c.status))
        counts = {status: int(n) for status, n in counted.all()}
        pages = max(1, -(-sum(counts.values()) // PAGE_SIZE))
        if page > pages:
            raise errors.NotFound(f"no page {page} of batch {batch_id!r}: it has {pages}")
        rows = (
            (
                await conn.execute(
                    select(jobs)
                    .where(*mine)
                    .order_by(jobs.c.batch_index, jobs.c.id)
                    .limit(PAGE_SIZE)
                    .offset((page - 1) * PAGE_SIZE)
                )
            )
            .mappings()
            .all()
        )
    return GalleryPage(
        batch_id=batch["id"],
        # The batch object's status rule, derived from the counts (the row's own status column lags behind).
        batch_status=batch_object(res, batch, counts, finished_at=None)["status"],
        metadata=batch["metadata"] or {},
        counts={s: counts[s] for s in STATUS_ORDER if counts.get(s)},
        page=page,
        pages=pages,
        tiles=[_tile(r, res) for r in rows],
    )
