"""The input images of an edit job: resolved from the tenant's uploads in S3 or fetched from URLs, then decoded
under the same limits as an upload. Runs ahead of the accelerator, in the thread that prepares the next batch."""

from __future__ import annotations

from typing import Any

from PIL import Image
from sqlalchemy import Engine, select

from core import storage
from core.errors import ValidationFailed
from core.fetch import fetch_url
from core.images import MAX_IMAGE_BYTES, load_image
from core.lifecycle import ClaimedJob
from core.models import uploads
from core.retry import Backoff, db_call, retrying
from core.settings import Settings
from worker.engine import EditRequest


def edit_request(job: ClaimedJob, *, db: Engine, s3: Any, settings: Settings) -> EditRequest:
    """The engine request of an edit job, its images loaded; ValidationFailed when an input is unusable."""
    r = job.request

    def load(ref: dict[str, Any], field: str, *, mask: bool = False) -> Image.Image:
        return _load(job, ref, field, mask=mask, db=db, s3=s3, settings=settings)

    images = tuple(load(ref, f"input_images.{i}") for i, ref in enumerate(r["input_images"]))
    mask = load(r["mask"], "mask", mask=True) if r.get("mask") else None
    if mask is not None and mask.size != images[0].size:
        raise ValidationFailed(
            f"the mask is {mask.width}x{mask.height} but its image is {images[0].width}x{images[0].height}",
            [{"field": "mask", "message": "mask size must match its image"}],
        )
    return EditRequest(
        mode=r["mode"],
        prompt=r["prompt"],
        images=images,
        mask=mask,
        width=r["width"],
        height=r["height"],
        steps=r["steps"],
        guidance_scale=r["guidance_scale"],
        strength=r.get("strength", 0.6),
        seeds=job.seeds,
        negative_prompt=r.get("negative_prompt"),
    )


def _load(
    job: ClaimedJob, ref: dict[str, Any], field: str, *, mask: bool, db: Engine, s3: Any, settings: Settings
) -> Image.Image:
    """One input image: the tenant's upload from S3, or a URL fetched under the SSRF rules; decoded, checked."""
    s = settings
    if ref.get("upload_id"):
        query = select(uploads.c.key).where(uploads.c.id == ref["upload_id"], uploads.c.tenant_id == job.tenant_id)
        key = db_call(db, lambda conn: conn.execute(query).scalar(), deadline_s=s.db_retry_s, what="find upload")
        if key is None:  # checked at submit; gone since (or another tenant's, which looks the same)
            detail = {"field": f"{field}.upload_id", "message": "no such upload"}
            raise ValidationFailed(f"{field}: no such upload", [detail])
        data = retrying(
            lambda: storage.get_object_bytes(s3, s.s3_bucket, key, max_bytes=MAX_IMAGE_BYTES),
            backoff=Backoff(deadline_s=s.storage_retry_s),
            what=f"read upload {ref['upload_id']}",
        )
    else:
        data = fetch_url(
            ref["url"],
            field=f"{field}.url",
            allow_hosts=s.fetch_allow_hosts,
            timeout_s=s.fetch_timeout_s,
            max_bytes=s.fetch_max_bytes,
            max_redirects=s.fetch_max_redirects,
        ).data
    return load_image(data, mask=mask, field=field)
