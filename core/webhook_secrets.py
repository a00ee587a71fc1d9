"""Tenants' webhook secrets and the Standard Webhooks signature (https://www.standardwebhooks.com/).

Each tenant has one secret, ``whsec_`` + base64 of 32 random bytes, made when the tenant is created (or on first
use for older tenants). ``zimage-admin webhook-secret rotate`` replaces it and keeps the old one as ``previous``:
for ``ZIMAGE_WEBHOOK_SECRET_GRACE_S`` after the rotation every webhook carries two signatures, so a receiver
verifies with either secret while it switches. The signing itself is the maintained ``standardwebhooks`` package:
``v1,`` + base64 HMAC-SHA256 of ``{webhook-id}.{webhook-timestamp}.{body}``; several signatures are separated by
spaces in ``webhook-signature``.

The secrets are stored as they are (an HMAC key must be usable, not just checkable); the database is the
service's own secret store, like its S3 credentials.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Update, func, select, update
from standardwebhooks import Webhook

from core.models import tenants

PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh secret: ``whsec_`` and the base64 of 32 random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class SigningKeys:
    """The secrets a webhook is signed with now: the current one, and the previous one during its grace."""

    current: str
    previous: str | None = None

    @property
    def all(self) -> tuple[str, ...]:
        """Every secret that signs, the current one first."""
        return (self.current,) if self.previous is None else (self.current, self.previous)


def sign(keys: SigningKeys, msg_id: str, timestamp: datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,…`` signature per secret, separated by spaces."""
    return " ".join(Webhook(secret).sign(msg_id, timestamp, body) for secret in keys.all)


def headers(keys: SigningKeys, msg_id: str, body: str, *, now: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt (the timestamp is the attempt's, in whole seconds)."""
    at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": sign(keys, msg_id, at, body),
    }


def keys_from_row(current: str, previous: str | None, rotated_at: datetime | None, *, grace_s: float) -> SigningKeys:
    """The signing keys of a tenant row: the previous secret only while its grace after ``rotated_at`` lasts."""
    in_grace = (
        previous is not None and rotated_at is not None and (datetime.now(UTC) - rotated_at).total_seconds() < grace_s
    )
    return SigningKeys(current, previous if in_grace else None)


def fill_missing(tenant_id: str) -> Update:
    """The UPDATE that gives the tenant a secret if it has none (tenants created before webhooks); a no-op else."""
    return (
        update(tenants)
        .where(tenants.c.id == tenant_id, tenants.c.webhook_secret.is_(None))
        .values(webhook_secret=new_secret())
    )


def ensure_secret(conn: Connection, tenant_id: str) -> str:
    """The tenant's current secret, made now if it has none; commits."""
    conn.execute(fill_missing(tenant_id))
    secret = conn.execute(select(tenants.c.webhook_secret).where(tenants.c.id == tenant_id)).scalar_one()
    conn.commit()
    return str(secret)


def show(conn: Connection, tenant_name: str) -> tuple[str, str | None, datetime | None] | None:
    """The tenant's current secret (made if missing), previous secret and rotation time; None: no such tenant."""
    tenant_id = conn.execute(select(tenants.c.id).where(tenants.c.name == tenant_name)).scalar()
    if tenant_id is None:
        return None
    current = ensure_secret(conn, tenant_id)
    previous, rotated_at = conn.execute(
        select(tenants.c.webhook_secret_previous, tenants.c.webhook_secret_rotated_at).where(tenants.c.id == tenant_id)
    ).one()
    conn.commit()
    return current, previous, rotated_at


def rotate(conn: Connection, tenant_name: str) -> str | None:
    """Give the tenant a new secret, keeping the current one as ``previous`` (it still signs during the grace
    period); the new secret, or None when there is no such tenant. Commits."""
    fresh = new_secret()
    done = conn.execute(
        update(tenants)
        .where(tenants.c.name == tenant_name)
        .values(
            webhook_secret_previous=tenants.c.webhook_secret,
            webhook_secret=fresh,
            webhook_secret_rotated_at=func.clock_timestamp(),
        )
        .returning(tenants.c.id)
    ).scalar()
    conn.commit()
    return fresh if done is not None else None
