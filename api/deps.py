"""Request dependencies: the per-process resources made in the lifespan, and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import Caller, KeyCache
from api.rate_limit import CALLER
from api.resources import Resources
from core import errors


async def get_resources(request: Request) -> Resources:
    """The resources the lifespan built for this process (``async``: FastAPI runs a plain function dependency in
    its thread pool, a thread hand-off on every request)."""
    return request.app.state.resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def get_tenant(request: Request, res: ResourcesDep) -> str:
    """The tenant id of the caller's API key; 401 when the key is missing, unknown or revoked."""
    known: Caller | None = request.scope.get("state", {}).get(CALLER)
    if known is not None:  # looked up before the body was read (api.rate_limit)
        return known.tenant_id
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    cache: KeyCache = res.keys
    tenant = await cache.tenant_for(key.strip())
    if tenant is None:
        raise errors.Unauthorized("unknown or revoked API key")
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
