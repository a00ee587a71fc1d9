"""Uploads of a tenant: check an input image, store the original in S3 with its row, and read it back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from starlette.concurrency import run_in_threadpool

from api.resources import Resources
from core import errors, ids, storage
from core.images import MAX_IMAGE_BYTES, ImageInfo, inspect_image
from core.job_object import rfc3339
from core.models import Upload, uploads


async def create_upload(res: Resources, *, tenant_id: str, data: bytes) -> dict[str, Any]:
    """Check ``data`` as an image, store it and its row; the upload object (422/413 bad image, 503 S3 down)."""
    # Parsing and decoding take CPU time: off the event loop, like the blocking S3 call.
    info = await run_in_threadpool(inspect_image, data, max_bytes=MAX_IMAGE_BYTES)
    upload = ids.upload_id()
    key = storage.upload_key(tenant_id, upload, info.ext)
    await run_in_threadpool(_store, res, key, data, info)
    async with res.db.begin() as conn:
        created_at = (
            await conn.execute(
                insert(Upload)
                .values(
                    id=upload,
                    tenant_id=tenant_id,
                    key=key,
                    width=info.width,
                    height=info.height,
                    format=info.format,
                    bytes=info.bytes,
                    sha256=info.sha256,
                )
                .returning(Upload.created_at)
            )
        ).scalar_one()
    return upload_object(upload, info.width, info.height, info.format, info.bytes, info.sha256, created_at)


async def get_upload(res: Resources, *, tenant_id: str, upload_id: str) -> dict[str, Any]:
    """One upload of the tenant; NotFound for an unknown id or another tenant's."""
    async with res.db.connect() as conn:
        row = (
            await conn.execute(select(uploads).where(uploads.c.id == upload_id, uploads.c.tenant_id == tenant_id))
        ).one_or_none()
    if row is None:
        raise errors.NotFound(f"no upload {upload_id}")
    return upload_object(row.id, row.width, row.height, row.format, row.bytes, row.sha256, row.created_at)


def upload_object(
    upload_id: str, width: int, height: int, fmt: str, size: int, sha256: str, created_at: datetime
) -> dict[str, Any]:
    """The API's view of an upload."""
    return {
        "id": upload_id,
        "object": "upload",
        "width": width,
        "height": height,
        "format": fmt,
        "bytes": size,
        "sha256": sha256,
        "created_at": rfc3339(created_at),
    }


def _store(res: Resources, key: str, data: bytes, info: ImageInfo) -> None:
    """Put the original bytes in S3 with their SHA-256 (the server verifies it); 503 when S3 fails."""
    try:
        storage.put_object_checked(res.s3_data, res.settings.s3_bucket, key, data, info.content_type)
    except storage.StorageError as exc:
        reason = exc.s3_code or "error"
        raise errors.Unavailable(f"storage is unavailable; the upload was not saved ({reason})") from exc
