"""Webhook delivery against real Postgres and real HTTP on loopback: signed (Standard Webhooks), retried until a
2xx, refused without a connection where the URL points somewhere private, recorded attempt by attempt and listed
to the job's own tenant only."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, select, update
from standardwebhooks import Webhook

import core.webhook_delivery
from core import fetch
from core.admin import webhook_secret
from core.errors import ValidationFailed
from core.models import jobs, tenants, webhook_deliveries
from core.settings import Settings
from core.webhook_urls import parsed_webhook_url
from tests.helpers.api import auth
from tests.helpers.webhooks import Receiver, attempts, deliveries, delivering, settled, succeed, wait_for

Tenant = Callable[[], tuple[str, str, str]]


def submit(client: TestClient, key: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("prompt", "a lighthouse at dusk")
    fields.setdefault("width", 256)
    fields.setdefault("height", 256)
    r = client.post("/v1/jobs", json=fields, headers=auth(key))
    assert r.status_code == 202, r.text
    return r.json()


def without_signed_urls(job: dict[str, Any]) -> dict[str, Any]:
    """A job object less what is signed afresh each time it is rendered."""
    outputs = [{k: v for k, v in o.items() if k not in ("url", "url_expires_at")} for o in job["outputs"]]
    return {**job, "outputs": outputs}


def test_a_receiver_that_fails_twice_gets_three_signed_attempts_and_the_job_object(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    _, key, secret = tenant()
    with Receiver([500, 500]) as rx:
        rx.secrets = [secret]
        job = submit(client, key, webhook_url=rx.url)
        assert job["request"]["webhook_url"] == rx.url
        succeed(db, job["id"])
        (delivery,) = deliveries(db, job_id=job["id"])
        with delivering(hook_settings):
            done = wait_for(lambda: settled(db, delivery["id"]))
    assert (done["status"], done["attempts"], done["last_status_code"]) == ("succeeded", 3, 200)
    assert done["delivered_at"] is not None
    tries = attempts(db, delivery["id"])
    assert [t["status_code"] for t in tries] == [500, 500, 200]
    assert all(t["error"] is None and t["latency_ms"] >= 0 for t in tries)
    # Every attempt is signed with the tenant's secret and carries the delivery's id: the receiver deduplicates.
    assert len(rx.requests) == 3
    assert all(r.verified_with == [secret] for r in rx.requests)
    assert {r.headers["webhook-id"] for r in rx.requests} == {delivery["id"]}
    assert all(r.headers["content-type"] == "application/json" for r in rx.requests)
    # The body is the job object as the API renders it (its presigned URLs made when it was sent).
    body = json.loads(rx.requests[-1].body)
    shown = client.get(f"/v1/jobs/{job['id']}", headers=auth(key)).json()
    assert body["status"] == "succeeded" and body["outputs"][0]["url"].startswith("http")
    assert without_signed_urls(body) == without_signed_urls(shown)

    # GET …/webhooks lists each attempt; another tenant sees nothing of it.
    listing = client.get(f"/v1/jobs/{job['id']}/webhooks", headers=auth(key))
    assert listing.status_code == 200, listing.text
    (shown_delivery,) = listing.json()["data"]
    assert shown_delivery["id"] == delivery["id"] and shown_delivery["status"] == "succeeded"
    assert shown_delivery["url"] == rx.url and shown_delivery["next_attempt_at"] is None
    assert [(a["attempt"], a["status_code"]) for a in shown_delivery["attempts"]] == [(1, 500), (2, 500), (3, 200)]
    assert all(a["started_at"].endswith("Z") and a["latency_ms"] >= 0 for a in shown_delivery["attempts"])
    _, other_key, _ = tenant()
    for path in (f"/v1/jobs/{job['id']}/webhooks", "/v1/jobs/job_unknown/webhooks", "/v1/batches/bat_x/webhooks"):
        answer = client.get(path, headers=auth(other_key))
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_a_pending_retry_shows_its_next_attempt(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    slow = hook_settings.model_copy(update={"webhook_retry_base_s": 600.0, "webhook_retry_max_s": 600.0})
    with Receiver(default=503) as rx:
        job = submit(client, key, webhook_url=rx.url)
        succeed(db, job["id"])
        (delivery,) = deliveries(db, job_id=job["id"])
        with delivering(slow):
            wait_for(lambda: attempts(db, delivery["id"]))
    (shown,) = client.get(f"/v1/jobs/{job['id']}/webhooks", headers=auth(key)).json()["data"]
    assert shown["status"] == "pending" and shown["last_status_code"] == 503
    assert shown["next_attempt_at"] is not None and shown["attempts"][0]["status_code"] == 503


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x",
        "https://10.0.0.1/x",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x",
        "https://[fd00:ec2::254]/x",
        "http://hooks.example.com/x",  # public, but not https
        "https://user:pw@hooks.example.com/x",
        "https://hooks.internal.test/x",  # a name that resolves to loopback, not allow-listed
        "https://mixed.internal.test/x",  # one public and one private address: refused
    ],
)
def test_a_webhook_url_on_a_private_address_is_refused_at_submit(
    client: TestClient, db: Engine, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    table = {"hooks.internal.test": ["127.0.0.1"], "mixed.internal.test": ["93.184.216.34", "192.168.1.5"]}
    monkeypatch.setattr(fetch, "resolve", lambda host, port: table[host])
    _, key, _ = tenant()
    r = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": url}, headers=auth(key))
    assert r.status_code == 422, r.text
    assert [d["field"] for d in r.json()["error"]["details"]] == ["webhook_url"]
    # The same for a batch's own webhook and for a job's inside a batch (named by its index); nothing is created.
    body = {"jobs": [{"prompt": "a"}, {"prompt": "b", "webhook_url": url}], "webhook_url": url}
    r = client.post("/v1/batches", json=body, headers=auth(key))
    assert r.status_code == 422, r.text
    details = r.json()["error"]["details"]
    assert {(d.get("index"), d["field"]) for d in details} == {(None, "webhook_url"), (1, "webhook_url")}
    assert client.get("/v1/jobs", headers=auth(key)).json()["data"] == []


def test_http_is_refused_in_production_even_for_an_allow_listed_host(hook_settings: Settings) -> None:
    assert parsed_webhook_url("http://127.0.0.1:9/x", hook_settings).scheme == "http"
    production = hook_settings.model_copy(update={"environment": "production"})
    with pytest.raises(ValidationFailed) as refused:
        parsed_webhook_url("http://127.0.0.1:9/x", production)
    assert refused.value.details == [{"field": "webhook_url", "message": "must be an https URL"}]
    assert parsed_webhook_url("https://127.0.0.1:9/x", production).scheme == "https"


def test_a_delivery_to_a_private_address_fails_without_any_connection(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows put straight into the outbox (as if the URL had changed its answer since the submit): the delivery
    # process checks again, and never connects.
    monkeypatch.setattr(fetch, "resolve", lambda host, port: {"rebound.internal.test": ["10.9.8.7"]}[host])
    connects: list[Any] = []
    real_pinned = core.webhook_delivery.pinned
    monkeypatch.setattr(core.webhook_delivery, "pinned", lambda *a: connects.append(a) or real_pinned(*a))
    _, key, _ = tenant()
    job = submit(client, key)
    urls = ["http://10.0.0.1/x", "https://169.254.169.254/latest", "https://rebound.internal.test/hook"]
    ids = []
    with db.begin() as conn:
        for url in urls:
            ids.append(
                conn.execute(
                    insert(webhook_deliveries)
                    .values(tenant_id=job_id_tenant(db, job["id"]), job_id=job["id"], url=url, payload={})
                    .returning(webhook_deliveries.c.id)
                ).scalar_one()
            )
    with delivering(hook_settings):
        done = [wait_for(lambda d=d: settled(db, d)) for d in ids]
    for row in done:
        assert (row["status"], row["attempts"], row["last_status_code"]) == ("failed", 1, None)
        assert row["last_error"].startswith("refused: webhook_url")
        (attempt,) = attempts(db, row["id"])
        assert attempt["status_code"] is None and attempt["error"].startswith("refused")
    assert connects == []


def job_id_tenant(db: Engine, job_id: str) -> str:
    with db.connect() as conn:
        return str(conn.execute(select(jobs.c.tenant_id).where(jobs.c.id == job_id)).scalar_one())


def test_a_receiver_that_never_answers_times_out_and_is_retried(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    quick = hook_settings.model_copy(update={"webhook_timeout_s": 0.3})
    with Receiver(default=-1, hang_s=2.0) as rx:
        job = submit(client, key, webhook_url=rx.url)
        succeed(db, job["id"])
        (delivery,) = deliveries(db, job_id=job["id"])
        with delivering(quick):
            tries = wait_for(lambda: len(attempts(db, delivery["id"])) >= 2 and attempts(db, delivery["id"]))
    assert all(t["status_code"] is None and t["error"].startswith("timeout") for t in tries)
    assert all(250 <= t["latency_ms"] < 1500 for t in tries)
    assert settled(db, delivery["id"]) is None  # still owed: retried later


def test_deliveries_give_up_after_the_retry_window(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    short = hook_settings.model_copy(update={"webhook_retry_for_s": 0.5})
    with Receiver(default=500) as rx:
        job = submit(client, key, webhook_url=rx.url)
        succeed(db, job["id"])
        (delivery,) = deliveries(db, job_id=job["id"])
        with delivering(short):
            done = wait_for(lambda: settled(db, delivery["id"]))
    assert done["status"] == "failed" and done["last_status_code"] == 500 and done["attempts"] >= 1
    assert len(attempts(db, delivery["id"])) == done["attempts"]


def test_one_endpoint_gets_one_delivery_at_a_time(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    with Receiver() as rx:
        inflight = {"now": 0, "max": 0}
        lock = threading.Lock()
        handler = rx.server.RequestHandlerClass
        original = handler.do_POST  # type: ignore[attr-defined]

        def slow_post(self: Any) -> None:
            with lock:
                inflight["now"] += 1
                inflight["max"] = max(inflight["max"], inflight["now"])
            time.sleep(0.05)
            try:
                original(self)
            finally:
                with lock:
                    inflight["now"] -= 1

        handler.do_POST = slow_post  # type: ignore[attr-defined]
        jobs_ = [submit(client, key, webhook_url=rx.url, seed=i) for i in range(8)]
        for job in jobs_:
            succeed(db, job["id"])
        ids = [deliveries(db, job_id=j["id"])[0]["id"] for j in jobs_]
        with delivering(hook_settings):
            for d in ids:
                wait_for(lambda d=d: settled(db, d))
    assert inflight["max"] == 1
    assert len(rx.requests) == 8
    assert rx.connections == 1  # one keep-alive connection carried them all


def test_a_secret_for_a_tenant_that_had_none_is_made_on_first_use(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    name, key, _ = tenant()
    with db.begin() as conn:  # a tenant from before webhooks
        conn.execute(update(tenants).where(tenants.c.name == name).values(webhook_secret=None))
    with Receiver() as rx:
        job = submit(client, key, webhook_url=rx.url)
        succeed(db, job["id"])
        (delivery,) = deliveries(db, job_id=job["id"])
        with delivering(hook_settings):
            wait_for(lambda: settled(db, delivery["id"]))
        secret = webhook_secret(hook_settings, name, rotate=False)
        assert secret is not None
    Webhook(secret).verify(rx.requests[0].body, rx.requests[0].headers)
