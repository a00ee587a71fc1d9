"""``/v1/adapters``: upload a LoRA adapter (a ``.safetensors`` file, streamed and checked), list, read, delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError
from python_multipart.multipart import parse_options_header

from api import adapters as adapter_ops
from api.deps import ResourcesDep, TenantDep
from api.multipart import FILE_FIELD
from core import errors
from core.schemas import ErrorBody, error_details

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}
_NAME_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": adapter_ops.MAX_NAME}


class AdapterFromUrl(BaseModel):
    """An adapter fetched from a URL (https; http only for a host on ``ZIMAGE_FETCH_ALLOW_HOSTS``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: HttpUrl
    name: str | None = Field(
        None, min_length=1, max_length=adapter_ops.MAX_NAME, description="default: the URL's file name"
    )


_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {"type": "string", "format": "binary", "minLength": 1},
                        adapter_ops.NAME_FIELD: _NAME_SCHEMA,
                    },
                }
            },
            "application/json": {"schema": AdapterFromUrl.model_json_schema()},
        },
    }
}


class AdapterObject(BaseModel):
    """A LoRA adapter: its file checked against the served transformer, stored once, named by jobs' ``loras``."""

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    bytes: int
    sha256: str
    rank: int
    target_modules: list[str]
    created_at: str


class AdapterPage(BaseModel):
    """A page of adapters, newest first."""

    data: list[AdapterObject]
    next_cursor: str | None


@router.post("", status_code=201, response_model=AdapterObject, responses=_ERRORS, openapi_extra=_BODY)
async def create_adapter(request: Request, res: ResourcesDep, tenant: TenantDep) -> JSONResponse:
    """Upload a ``.safetensors`` LoRA adapter (multipart field ``file``, up to 2 GiB, streamed), or have it fetched
    (JSON ``{"url": ...}``); 201 once the whole file is stored and checked."""
    media, _ = parse_options_header(request.headers.get("content-type"))
    if media == b"multipart/form-data":
        adapter = await adapter_ops.create_from_form(res, request, tenant_id=tenant)
    elif media == b"application/json":
        body = await _small_body(request, res.settings.max_body_bytes)
        try:
            req = AdapterFromUrl.model_validate_json(body)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise errors.BadRequest("the body is not valid JSON") from None
            details = error_details(exc)
            raise errors.ValidationFailed(
                f"invalid request: {', '.join(d['field'] for d in details)}", details
            ) from None
        adapter = await adapter_ops.create_from_url(res, tenant_id=tenant, url=str(req.url), name=req.name)
    else:
        raise errors.UnsupportedMediaType(
            "send the adapter as multipart/form-data with a 'file' field, or JSON with its url",
            [{"field": "Content-Type", "message": "must be multipart/form-data or application/json"}],
        )
    return JSONResponse(adapter, status_code=201, headers={"Location": f"/v1/adapters/{adapter['id']}"})


@router.get("", response_model=AdapterPage, responses=_ERRORS)
async def list_adapters(
    res: ResourcesDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=adapter_ops.MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(pattern=adapter_ops.CURSOR_PATTERN)] = None,
) -> dict[str, Any]:
    """The tenant's adapters, newest first, a page at a time."""
    return await adapter_ops.list_adapters(res, tenant_id=tenant, limit=limit, cursor=cursor)


@router.get("/{adapter_id}", response_model=AdapterObject, responses=_ERRORS)
async def get_adapter(adapter_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """One adapter of this tenant (another tenant's id is a 404, like an unknown one)."""
    return await adapter_ops.get_adapter(res, tenant_id=tenant, adapter_id=adapter_id)


@router.delete("/{adapter_id}", status_code=204, response_class=Response, responses=_ERRORS)
async def delete_adapter(adapter_id: str, res: ResourcesDep, tenant: TenantDep) -> Response:
    """Delete an adapter and its file; 409 while a queued or running job of this tenant names it."""
    await adapter_ops.delete_adapter(res, tenant_id=tenant, adapter_id=adapter_id)
    return Response(status_code=204)


async def _small_body(request: Request, max_bytes: int) -> bytes:
    """A JSON body, refused (413) past ``max_bytes`` as it streams: the route's body limit is the adapter's."""
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > max_bytes:
            raise errors.PayloadTooLarge(
                f"the body is over {max_bytes} bytes",
                [{"field": "body", "message": f"must be at most {max_bytes} bytes"}],
            )
    return bytes(body)
