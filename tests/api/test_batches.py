"""Bulk batches through the real app on real Postgres and Redis: 10 000 jobs at once, all or nothing, counted,
listed, canceled, streamed as a manifest, and invisible to every other tenant."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from tests.helpers.api import auth

BIG = 10_000


@pytest.fixture(autouse=True)
def leave_no_backlog(client: TestClient, db: Engine, redis_client: redis.Redis, redis_prefix: str) -> Iterator[None]:
    """The batches made here never run: drop their jobs and wake-ups, so later suites' workers see no backlog."""
    broker = f"{redis_prefix}generate"
    before = redis_client.llen(broker)
    yield
    time.sleep(0.2)  # a batch's background publish may still be finishing
    with db.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE batch_id IS NOT NULL AND status IN ('queued', 'running')"))
    grown = redis_client.llen(broker) - before
    if grown > 0:  # LPUSH adds at the head: the newest messages are the first ones
        redis_client.ltrim(broker, grown, -1)


def jobs_of(db: Engine, batch_id: str) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(
            text("SELECT id, batch_index, status, request, dispatched_at FROM jobs WHERE batch_id = :b"),
            {"b": batch_id},
        )
        return [dict(r._mapping) for r in rows]


def count_tenant_jobs(db: Engine, key: str) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM jobs j JOIN api_keys k ON k.tenant_id = j.tenant_id"
                    " WHERE k.key_hash = encode(sha256(convert_to(:k, 'UTF8')), 'hex')"
                ),
                {"k": key},
            ).scalar()
            or 0
        )


def wait_for(check: Any, timeout_s: float = 30.0) -> Any:
    """Poll ``check`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_10000_job_batch_is_accepted_counted_and_published(
    client: TestClient, key: str, db: Engine, redis_client: redis.Redis, redis_prefix: str
) -> None:
    broker = f"{redis_prefix}generate"
    before = redis_client.llen(broker)
    body = {
        "defaults": {"width": 256, "height": 256, "steps": 2},
        "jobs": [{"prompt": f"product {i}", "seed": i, "metadata": {"sku": i}} for i in range(BIG)],
        "metadata": {"campaign": "spring"},
    }
    answer = client.post("/v1/batches", json=body, headers=auth(key))
    assert answer.status_code == 202, answer.text
    batch = answer.json()
    assert answer.headers["location"] == f"/v1/batches/{batch['id']}"
    assert batch["counts"] == {"total": BIG, "queued": BIG, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
    assert (batch["status"], batch["metadata"]) == ("running", {"campaign": "spring"})
    rows = jobs_of(db, batch["id"])
    assert sorted(r["batch_index"] for r in rows) == list(range(BIG))
    assert all(r["status"] == "queued" for r in rows)
    assert {r["request"]["width"] for r in rows} == {256}  # the defaults applied
    # Every job is published once the background publish is through (one message per job, as for single jobs).
    wait_for(lambda: redis_client.llen(broker) - before >= BIG)
    assert all(r["dispatched_at"] is not None for r in rows)
    got = client.get(f"/v1/batches/{batch['id']}", headers=auth(key)).json()
    assert got["counts"]["queued"] == BIG and got["status"] == "running"
    page = client.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 5}, headers=auth(key)).json()
    assert len(page["data"]) == 5 and page["next_cursor"] and all(j["batch_id"] == batch["id"] for j in page["data"])


def test_one_bad_line_among_10000_creates_nothing_and_names_its_index(client: TestClient, key: str, db: Engine) -> None:
    lines = [json.dumps({"prompt": f"p{i}", "width": 256, "height": 256}) for i in range(BIG)]
    lines[4321] = json.dumps({"prompt": "bad", "width": 100})
    lines[9999] = json.dumps({"prompt": "", "height": 256})
    answer = client.post(
        "/v1/batches", content="\n".join(lines), headers={**auth(key), "Content-Type": "application/x-ndjson"}
    )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "validation_error"
    assert {(d["index"], d["field"]) for d in error["details"]} == {(4321, "width"), (9999, "prompt")}
    assert "4321" in error["message"] and "nothing was created" in error["message"]
    assert count_tenant_jobs(db, key) == 0


def test_ndjson_batches_work_and_blank_lines_are_skipped(client: TestClient, key: str) -> None:
    body = "\n".join([json.dumps({"prompt": "a", "width": 256, "height": 256}), "", json.dumps({"prompt": "b"})])
    answer = client.post("/v1/batches", content=body, headers={**auth(key), "Content-Type": "application/x-ndjson"})
    assert answer.status_code == 202, answer.text
    assert answer.json()["counts"]["total"] == 2


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "bad_request"),
        (b'{"prompt": "x"}\n{oops', "application/x-ndjson", 400, "bad_request"),
        (b'{"jobs": []}', "application/json", 422, "validation_error"),
        (b'{"jobs": [{"prompt": "x"}], "extra": 1}', "application/json", 422, "validation_error"),
        (b'{"jobs": [{"prompt": "x"}], "webhook_url": "https://10.0.0.1/x"}', "application/json", 422,
         "validation_error"),
        (b'{"jobs": [{"prompt": "x"}], "webhook_url": 5}', "application/json", 422, "validation_error"),
        (b'[{"prompt": "x"}]', "application/json", 422, "validation_error"),
        (b"prompt=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)  # fmt: skip
def test_bad_batch_bodies_get_clear_errors(
    client: TestClient, key: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    answer = client.post("/v1/batches", content=body, headers={**auth(key), "Content-Type": content_type})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


def test_more_jobs_than_the_limit_is_413(client: TestClient, key: str, db: Engine) -> None:
    body = {"jobs": [{"prompt": "x"}] * (BIG + 1)}
    answer = client.post("/v1/batches", json=body, headers=auth(key))
    assert answer.status_code == 413 and answer.json()["error"]["details"][0]["field"] == "jobs"
    assert count_tenant_jobs(db, key) == 0


def test_idempotency_key_covers_the_whole_batch(client: TestClient, key: str, db: Engine) -> None:
    body = {"jobs": [{"prompt": f"k{i}", "width": 256, "height": 256} for i in range(3)]}
    headers = {**auth(key), "Idempotency-Key": "batch-7"}
    first = client.post("/v1/batches", json=body, headers=headers)
    again = client.post("/v1/batches", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/batches", json={"jobs": [{"prompt": "other"}]}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["details"][0]["field"] == "Idempotency-Key"
    assert count_tenant_jobs(db, key) == 3


def test_cancel_cancels_every_job_not_yet_terminal_then_409(client: TestClient, key: str, db: Engine) -> None:
    batch = client.post(
        "/v1/batches", json={"jobs": [{"prompt": f"c{i}", "width": 256, "height": 256} for i in range(5)]},
        headers=auth(key),
    ).json()  # fmt: skip
    rows = sorted(jobs_of(db, batch["id"]), key=lambda r: r["batch_index"])
    with db.begin() as conn:  # one job already ended, one is running
        conn.execute(
            text("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = :id"), {"id": rows[0]["id"]}
        )
        conn.execute(text("UPDATE jobs SET status = 'running', attempt = 1 WHERE id = :id"), {"id": rows[1]["id"]})
    answer = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(key))
    assert answer.status_code == 200
    view = answer.json()
    assert view["status"] == "canceled" and view["finished_at"] is not None
    assert (view["counts"]["canceled"], view["counts"]["succeeded"]) == (4, 1)
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(key))
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


def test_the_manifest_streams_one_line_per_job_in_order(client: TestClient, key: str) -> None:
    jobs = [{"prompt": f"m{i}", "width": 256, "height": 256, "seed": 100 + i, "metadata": {"i": i}} for i in range(900)]
    batch = client.post("/v1/batches", json={"jobs": jobs}, headers=auth(key)).json()
    with client.stream("GET", f"/v1/batches/{batch['id']}/manifest", headers=auth(key)) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert [line["index"] for line in lines] == list(range(900))
    assert [line["seed"] for line in lines[:3]] == [100, 101, 102]
    assert lines[7]["metadata"] == {"i": 7} and lines[7]["status"] == "queued" and lines[7]["outputs"] == []


def test_another_tenants_batch_is_404_on_every_endpoint(client: TestClient, key: str, new_key: Any) -> None:
    batch = client.post("/v1/batches", json={"jobs": [{"prompt": "mine"}]}, headers=auth(key)).json()
    other = new_key()
    for method, path in [
        ("GET", f"/v1/batches/{batch['id']}"),
        ("GET", f"/v1/batches/{batch['id']}/jobs"),
        ("POST", f"/v1/batches/{batch['id']}/cancel"),
        ("GET", f"/v1/batches/{batch['id']}/manifest"),
        ("GET", "/v1/batches/bat_unknown"),
    ]:
        answer = client.request(method, path, headers=auth(other))
        assert answer.status_code == 404, (method, path)
        assert answer.json()["error"]["code"] == "not_found"
    # ... and the owner still sees it.
    assert client.get(f"/v1/batches/{batch['id']}", headers=auth(key)).status_code == 200
