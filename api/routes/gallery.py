"""``GET /v1/batches/{batch_id}/gallery``: a batch's images as an HTML page, for an API key or a signed link."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from api.deps import ResourcesDep, get_tenant
from api.gallery import gallery_headers, render_gallery
from api.gallery_page import read_gallery_page
from core import errors
from core.links import verify_gallery_token
from core.schemas import ErrorBody

router = APIRouter(prefix="/v1/batches", tags=["batches"])

# Stated as JSON: given as a model, FastAPI would document the errors in the route's own media type, HTML.
_ERROR_JSON = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": "an error", "content": _ERROR_JSON} for code in (401, 404, 422, 503)
}


@dataclass(frozen=True)
class GalleryCaller:
    """Who opened the gallery: the tenant, and the link token it came with (None with an API key)."""

    tenant_id: str
    token: str | None


async def gallery_caller(
    batch_id: str,
    request: Request,
    res: ResourcesDep,
    token: Annotated[
        str | None, Query(description="the signed token of the batch's `gallery_url`, for a browser", max_length=512)
    ] = None,
) -> GalleryCaller:
    """The caller's tenant: from ``Authorization: Bearer`` when the header is sent (API clients), else from the
    signed link token (a browser cannot send the header on a link, and an API key must never sit in a URL)."""
    if "authorization" in request.headers:
        return GalleryCaller(await get_tenant(request, res), None)
    if token is None:
        raise errors.Unauthorized(
            "send 'Authorization: Bearer <key>', or open the batch's signed gallery_url (…/gallery?token=…)"
        )
    return GalleryCaller(verify_gallery_token(res.settings.link_secret, token, batch_id), token)


@router.get("/{batch_id}/gallery", response_class=HTMLResponse, responses=_ERRORS)
async def batch_gallery(
    batch_id: str,
    res: ResourcesDep,
    caller: Annotated[GalleryCaller, Depends(gallery_caller)],
    page: Annotated[int, Query(ge=1, le=100_000, description="the page, from 1; 60 jobs a page")] = 1,
) -> HTMLResponse:
    """The batch's jobs as an HTML page of thumbnails, 60 a page in submission order; it refreshes itself while
    any job of the batch is queued or running."""
    view = await read_gallery_page(res, tenant_id=caller.tenant_id, batch_id=batch_id, page=page)

    def page_url(n: int) -> str:
        # A query-only link: it keeps the current path, and the token when the page was opened with one.
        return "?" + urlencode({"page": n} if caller.token is None else {"page": n, "token": caller.token})

    return HTMLResponse(render_gallery(view, page_url), headers=gallery_headers(view))
