"""Tenants and their API keys as an operator manages them (``zimage-admin``): list them, rotate and revoke keys,
set a tenant's limits. Each function runs in the caller's transaction; telling the API processes of a revocation
(``core.apikeys.announce``) is the caller's, after the commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, or_, select, update

from core import apikeys, ids
from core.models import api_keys, tenants

# The tenant columns ``set-limits`` sets: NULL takes the setting's default, 0 is no limit.
LIMITS = ("rate_limit_rps", "max_queued_jobs", "max_batch_jobs", "max_images_per_day")


@dataclass(frozen=True)
class TenantView:
    """A tenant as ``list-tenants`` shows it: its own limits (None: the default) and its active keys."""

    id: str
    name: str
    weight: float
    limits: dict[str, int | None]
    active_keys: int
    created_at: datetime


@dataclass(frozen=True)
class KeyView:
    """An API key as ``list-keys`` shows it: never the key, only its id and visible prefix."""

    id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def _active() -> Any:
    """Keys not revoked, or revoked at a time still to come (a rotation's grace)."""
    return or_(api_keys.c.revoked_at.is_(None), api_keys.c.revoked_at > func.now())


def tenant_id(conn: Connection, name: str) -> str | None:
    """The id of the tenant called ``name``, or None."""
    return conn.execute(select(tenants.c.id).where(tenants.c.name == name)).scalar()


def list_tenants(conn: Connection) -> list[TenantView]:
    """Every tenant, by name."""
    active = (
        select(func.count()).where(api_keys.c.tenant_id == tenants.c.id, _active()).correlate(tenants).scalar_subquery()
    )
    query = select(tenants, active.label("active_keys")).order_by(tenants.c.name)
    return [
        TenantView(r.id, r.name, r.weight, {c: r._mapping[c] for c in LIMITS}, r.active_keys, r.created_at)
        for r in conn.execute(query)
    ]


def list_keys(conn: Connection, tenant_name: str) -> list[KeyView] | None:
    """The tenant's keys, oldest first (revoked ones included); None when there is no such tenant."""
    tenant = tenant_id(conn, tenant_name)
    if tenant is None:
        return None
    query = (
        select(api_keys.c.id, api_keys.c.prefix, api_keys.c.created_at, api_keys.c.revoked_at)
        .where(api_keys.c.tenant_id == tenant)
        .order_by(api_keys.c.created_at, api_keys.c.id)
    )
    return [KeyView(r.id, r.prefix, r.created_at, r.revoked_at) for r in conn.execute(query)]


def add_key(conn: Connection, tenant: str) -> str:
    """A new key of the tenant with id ``tenant``; the key itself, which is stored only hashed."""
    key = apikeys.new_key()
    conn.execute(
        insert(api_keys).values(
            id=ids.key_id(), tenant_id=tenant, prefix=apikeys.display_prefix(key), key_hash=apikeys.hash_key(key)
        )
    )
    return key


def revoke_key(conn: Connection, key_or_id: str) -> str | None:
    """Revoke a key, named by itself or by its id (``key_…``, from ``list-keys``); the revoked key's hash, or
    None when no active key matched."""
    if key_or_id.startswith("key_"):
        which = api_keys.c.id == key_or_id
    else:
        which = api_keys.c.key_hash == apikeys.hash_key(key_or_id)
    return conn.execute(
        update(api_keys).where(which, _active()).values(revoked_at=func.now()).returning(api_keys.c.key_hash)
    ).scalar()


def rotate_key(conn: Connection, tenant_name: str, grace_s: float = 0.0) -> tuple[str, list[str]] | None:
    """A new key for the tenant, and the hashes of its other active keys, which stop working ``grace_s`` from
    now (at once for 0); None when there is no such tenant."""
    tenant = tenant_id(conn, tenant_name)
    if tenant is None:
        return None
    until = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, grace_s)
    retired = conn.execute(
        update(api_keys)
        .where(
            api_keys.c.tenant_id == tenant,
            or_(api_keys.c.revoked_at.is_(None), api_keys.c.revoked_at > until),
        )
        .values(revoked_at=until)
        .returning(api_keys.c.key_hash)
    ).scalars()
    hashes = list(retired)
    return add_key(conn, tenant), hashes


def set_limits(conn: Connection, tenant_name: str, limits: dict[str, int | None]) -> str | None:
    """Set some of the tenant's limits (``LIMITS`` names; None: back to the setting's default, 0: no limit); the
    tenant's id, or None when there is no such tenant. A negative limit is a ``ValueError``."""
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
    negative = [name for name, value in limits.items() if value is not None and value < 0]
    if negative:
        raise ValueError(f"a limit is a whole number, 0 or more (0: no limit): {', '.join(negative)}")
    tenant = tenant_id(conn, tenant_name)
    if tenant is not None and limits:
        conn.execute(update(tenants).where(tenants.c.id == tenant).values(**limits))
    return tenant
