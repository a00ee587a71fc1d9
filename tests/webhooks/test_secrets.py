"""Tenants' signing secrets: made with the tenant, shown and rotated by ``zimage-admin webhook-secret``; after a
rotation both secrets verify a webhook during the grace period, then only the new one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from standardwebhooks import Webhook, WebhookVerificationError

from core import webhook_secrets
from core.admin import main as admin_main
from core.admin import webhook_secret
from core.settings import Settings
from tests.helpers.api import auth
from tests.helpers.webhooks import Receiver, deliveries, delivering, settled, succeed, wait_for

Tenant = Callable[[], tuple[str, str, str]]


def deliver_one(client: TestClient, db: Engine, settings: Settings, key: str, rx: Receiver) -> None:
    """Submit a job with ``rx`` as its webhook, end it, and wait until its webhook was accepted."""
    r = client.post(
        "/v1/jobs", json={"prompt": "x", "width": 256, "height": 256, "webhook_url": rx.url}, headers=auth(key)
    )
    assert r.status_code == 202, r.text
    succeed(db, r.json()["id"])
    (row,) = deliveries(db, job_id=r.json()["id"])
    with delivering(settings):
        wait_for(lambda: settled(db, row["id"]))


def test_after_a_rotation_both_secrets_verify_during_the_grace_period(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    name, key, old = tenant()
    new = webhook_secret(hook_settings, name, rotate=True)
    assert new is not None and new != old and new.startswith("whsec_")
    assert webhook_secret(hook_settings, name, rotate=False) == new
    with Receiver() as rx:
        rx.secrets = [old, new]
        deliver_one(client, db, hook_settings, key, rx)
        (got,) = rx.requests
        assert len(got.headers["webhook-signature"].split(" ")) == 2
        assert got.verified_with == [old, new]  # a receiver holding either secret accepts it

        # Once the grace period is over, only the new secret signs.
        rx.requests.clear()
        deliver_one(client, db, hook_settings.model_copy(update={"webhook_secret_grace_s": 0.0}), key, rx)
        (got,) = rx.requests
        assert len(got.headers["webhook-signature"].split(" ")) == 1
        assert got.verified_with == [new]
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(got.body, got.headers)


def test_the_signature_is_standard_webhooks() -> None:
    secret = webhook_secrets.new_secret()
    keys = webhook_secrets.SigningKeys(secret)
    headers = webhook_secrets.headers(keys, "whd_1", '{"a":1}')
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify('{"a":1}', headers) == {"a": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify('{"a":2}', headers)  # another body
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook_secrets.new_secret()).verify('{"a":1}', headers)  # another tenant's secret


def test_the_previous_secret_signs_only_within_the_grace() -> None:
    now = datetime.now(UTC)
    assert webhook_secrets.keys_from_row("whsec_new", "whsec_old", now, grace_s=60).all == ("whsec_new", "whsec_old")
    expired = now - timedelta(seconds=61)
    assert webhook_secrets.keys_from_row("whsec_new", "whsec_old", expired, grace_s=60).all == ("whsec_new",)
    assert webhook_secrets.keys_from_row("whsec_new", None, None, grace_s=60).all == ("whsec_new",)


def test_zimage_admin_shows_and_rotates_a_secret(
    hook_settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZIMAGE_DATABASE_URL", hook_settings.database_url)
    name, _, secret = tenant()
    assert admin_main(["webhook-secret", "show", "--tenant", name]) == 0
    assert capsys.readouterr().out.strip() == secret
    assert admin_main(["webhook-secret", "rotate", "--tenant", name]) == 0
    rotated = capsys.readouterr().out.strip()
    assert rotated.startswith("whsec_") and rotated != secret
    assert admin_main(["webhook-secret", "show", "--tenant", name]) == 0
    assert capsys.readouterr().out.strip() == rotated
    assert admin_main(["webhook-secret", "show", "--tenant", "no-such-tenant-here"]) == 1
