"""Verifying the service's webhooks (Standard Webhooks: the ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` headers, an HMAC-SHA256 of ``id.timestamp.body`` under the endpoint's ``whsec_…`` secret),
with the ``standardwebhooks`` package.

    from zimage_client import verify_webhook

    job = verify_webhook(secret, request.body, request.headers)   # InvalidWebhook if it is not genuine
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from .errors import InvalidWebhook

HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def verify_webhook(
    secret: str | bytes, body: bytes | str, headers: Mapping[str, str], *, check_timestamp: bool = True
) -> Any:
    """The webhook's JSON payload, once its signature verifies; InvalidWebhook otherwise.

    Args:
        secret: the endpoint's secret, ``whsec_<base64>`` (or the raw key bytes).
        body: the request body exactly as received (before any JSON parsing).
        headers: the request headers (any case).
        check_timestamp: refuse a timestamp more than 5 minutes from now (a replay). Off only to check a
            request saved earlier.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in HEADERS if not lowered.get(h)]
    if missing:
        raise InvalidWebhook(f"missing header(s): {', '.join(missing)}")
    try:
        hook = Webhook(secret)
        if check_timestamp:
            return hook.verify(body, lowered)
        return _verify_signature_only(hook, body, lowered)
    except (WebhookVerificationError, EmptyWebhookSecretError) as exc:
        raise InvalidWebhook(str(exc) or "the signature does not verify") from exc
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidWebhook(f"malformed secret, signature or body: {exc}") from exc


def _verify_signature_only(hook: Webhook, body: bytes | str, headers: Mapping[str, str]) -> Any:
    """``Webhook.verify`` without its clock check: the signature is made by the package's own ``sign``."""
    text = body if isinstance(body, str) else body.decode()
    timestamp = datetime.fromtimestamp(float(headers["webhook-timestamp"]), tz=UTC)
    expected = base64.b64decode(hook.sign(headers["webhook-id"], timestamp, text).split(",", 1)[1])
    for versioned in headers["webhook-signature"].split():
        version, _, signature = versioned.partition(",")
        if version == "v1" and hmac.compare_digest(expected, base64.b64decode(signature)):
            return json.loads(text)
    raise WebhookVerificationError("No matching signature found")
