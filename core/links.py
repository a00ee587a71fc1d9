"""Signed links: a short-lived token that lets a browser open one batch's gallery without an API key.

A browser cannot send ``Authorization`` on a link, and an API key must never sit in a URL (history, logs,
Referer). So the gallery also takes ``?token=…``: the tenant, the batch and an expiry, signed with HMAC-SHA256
under ``ZIMAGE_LINK_SECRET``. The token opens that one batch's gallery, and only until it expires.

    token = base64url(json([tenant_id, batch_id, expires_unix_s])) "." base64url(hmac_sha256(secret, …))

Refusals: a token that is malformed, tampered with, signed under another secret or made for another batch is
answered exactly like an unknown batch (404), so a token reveals nothing about batches it does not name. Only a
genuine token past its expiry gets its own answer (401), so that its holder knows to ask for a fresh link.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from urllib.parse import quote

from core import errors
from core.settings import Settings

# Binds a signature to this use: a MAC made for another purpose under the same secret never verifies here.
_DOMAIN = b"zimage-gallery-link:v1:"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: str) -> bytes:
    return hmac.new(secret.encode(), _DOMAIN + payload.encode("ascii"), hashlib.sha256).digest()


def gallery_token(secret: str, tenant_id: str, batch_id: str, ttl_s: int, now: float | None = None) -> str:
    """A token that opens ``batch_id``'s gallery as ``tenant_id`` for ``ttl_s`` seconds from ``now``."""
    expires = int((time.time() if now is None else now) + ttl_s)
    payload = _b64(json.dumps([tenant_id, batch_id, expires], separators=(",", ":")).encode())
    return f"{payload}.{_b64(_mac(secret, payload))}"


def verify_gallery_token(secret: str, token: str, batch_id: str, now: float | None = None) -> str:
    """The tenant a valid, unexpired token for ``batch_id`` names.

    NotFound (the body of an unknown batch) for a malformed, tampered or foreign token, or one made for another
    batch; Unauthorized for a genuine token that has expired.
    """
    not_found = errors.NotFound(f"no batch {batch_id!r}")
    payload, _, signature = token.partition(".")
    try:
        given = _unb64(signature)
        genuine = payload.isascii() and hmac.compare_digest(given, _mac(secret, payload))
        # Only a payload this service signed is parsed.
        fields = json.loads(_unb64(payload)) if genuine else None
    except (binascii.Error, ValueError):  # bad base64, UTF-8 or JSON
        raise not_found from None
    if not (
        isinstance(fields, list)
        and len(fields) == 3
        and all(isinstance(f, str) for f in fields[:2])
        and isinstance(fields[2], int)
    ):
        raise not_found
    tenant_id, token_batch, expires = fields
    if token_batch != batch_id:
        raise not_found
    if expires <= (time.time() if now is None else now):
        when = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        raise errors.Unauthorized(
            f"this gallery link expired at {when}; ask for a fresh one (GET /v1/batches/{batch_id} "
            "with your API key gives a new gallery_url)"
        )
    return str(tenant_id)


def gallery_url(settings: Settings, tenant_id: str, batch_id: str, now: float | None = None) -> str:
    """The batch's gallery as a relative link with a fresh token: ``/v1/batches/{id}/gallery?token=…``."""
    token = gallery_token(settings.link_secret, tenant_id, batch_id, settings.link_ttl_s, now=now)
    return f"/v1/batches/{quote(batch_id, safe='')}/gallery?token={token}"
