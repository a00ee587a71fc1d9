"""``/v1/uploads``: store an input image for edit jobs, checked before it is decoded, and read it back."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api import uploads as upload_ops
from api.deps import ResourcesDep, TenantDep
from api.multipart import FILE_FIELD, read_file_field
from core.images import MAX_IMAGE_BYTES
from core.schemas import ErrorBody

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503)
}
_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary", "minLength": 1}},
                }
            }
        },
    }
}


class UploadObject(BaseModel):
    """An uploaded input image; ``width`` and ``height`` are as displayed (EXIF orientation applied)."""

    id: str
    object: Literal["upload"] = "upload"
    width: int
    height: int
    format: Literal["png", "jpeg", "webp"]
    bytes: int
    sha256: str
    created_at: str


@router.post("", status_code=201, response_model=UploadObject, responses=_ERRORS, openapi_extra=_MULTIPART_BODY)
async def create_upload(request: Request, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Upload a PNG, JPEG or WEBP (multipart field ``file``, at most 20 MiB and 16 Mi pixels)."""
    data = await read_file_field(request, max_bytes=MAX_IMAGE_BYTES)
    return await upload_ops.create_upload(res, tenant_id=tenant, data=data)


@router.get("/{upload_id}", response_model=UploadObject, responses=_ERRORS)
async def get_upload(upload_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """One upload of this tenant (another tenant's id is a 404, like an unknown one)."""
    return await upload_ops.get_upload(res, tenant_id=tenant, upload_id=upload_id)
