"""``/v1/jobs`` against the real app (Postgres, Redis, S3): every endpoint and every status and error code."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.auth import KeyCache
from core import ids
from core.admin import revoke_key
from core.apikeys import hash_key
from core.db import make_async_engine
from core.schemas import MAX_SEED, JobRequest
from core.settings import Settings
from tests.helpers.api import auth

JOB_KEYS = {
    "id", "object", "status", "kind", "request", "batch_id", "priority", "attempts", "progress", "queue_position",
    "error", "outputs", "timings", "created_at", "started_at", "finished_at", "metadata",
}  # fmt: skip
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")


# --- helpers ----------------------------------------------------------------------------------------------


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The answer is ``status`` with exactly the error body of API.md; returns its ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    return error


def submit(client: TestClient, key: str, headers: dict[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    """POST a job (a prompt unless given) and return the job object of its 202."""
    fields.setdefault("prompt", "a lighthouse at dusk")
    r = client.post("/v1/jobs", json=fields, headers={**auth(key), **(headers or {})})
    assert r.status_code == 202, r.text
    return r.json()


def get(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def job_row(db: Engine, job_id: str) -> dict[str, Any] | None:
    with db.connect() as conn:
        row = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().first()
    return dict(row) if row is not None else None


def job_status(db: Engine, job_id: str) -> str:
    row = job_row(db, job_id)
    assert row is not None
    return str(row["status"])


def tenant_of(db: Engine, key: str) -> str:
    with db.connect() as conn:
        return conn.execute(
            text("SELECT tenant_id FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}
        ).scalar_one()


def count_jobs(db: Engine, tenant_id: str) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs WHERE tenant_id = :t"), {"t": tenant_id}).scalar_one()


def set_status(db: Engine, job_id: str, sql_set: str) -> None:
    with db.begin() as conn:
        assert conn.execute(text(f"UPDATE jobs SET {sql_set} WHERE id = :id"), {"id": job_id}).rowcount == 1


def decode(raw: bytes) -> tuple[str, list[Any]]:
    """The task name and positional args of a raw Celery message taken from a broker list."""
    msg = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
    return msg["headers"]["task"], args


def page(client: TestClient, key: str, **params: Any) -> dict[str, Any]:
    r = client.get("/v1/jobs", params=params, headers=auth(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"data", "next_cursor"}
    return body


# --- submit -----------------------------------------------------------------------------------------------


def test_submit_answers_202_with_location_and_the_job_object(client: TestClient, key: str) -> None:
    r = client.post("/v1/jobs", json={"prompt": "  a red fox in snow  ", "width": 512}, headers=auth(key))
    assert r.status_code == 202, r.text
    job = r.json()
    assert set(job) >= JOB_KEYS
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job_")
    assert job["object"] == "job"
    assert job["status"] == "queued"
    assert job["kind"] == "generate"
    assert job["batch_id"] is None
    assert job["priority"] == 5
    assert job["attempts"] == 0
    assert job["progress"] is None
    assert isinstance(job["queue_position"], int) and job["queue_position"] >= 0
    assert job["error"] is None
    assert job["outputs"] == []
    assert isinstance(job["timings"], dict)
    assert job["metadata"] == {}
    assert RFC3339_UTC.match(job["created_at"]), job["created_at"]
    assert job["started_at"] is None and job["finished_at"] is None


def test_the_request_is_echoed_normalized_with_the_seed_chosen(client: TestClient, key: str) -> None:
    job = submit(client, key, prompt="  a red fox  ", width=512, seed=None)
    request = job["request"]
    seed = request["seed"]
    assert isinstance(seed, int) and 0 <= seed <= MAX_SEED
    expected = JobRequest.model_validate({"prompt": "a red fox", "width": 512}).normalized()
    assert request == {**expected, "seed": seed}
    assert request["prompt"] == "a red fox"
    assert (request["steps"], request["guidance_scale"], request["height"]) == (8, 0.0, 1024)


def test_a_given_seed_priority_and_metadata_are_kept(client: TestClient, key: str) -> None:
    job = submit(client, key, seed=MAX_SEED, priority=8, metadata={"order": 17, "tags": ["a"]})
    assert job["request"]["seed"] == MAX_SEED
    assert job["priority"] == 8
    assert job["metadata"] == {"order": 17, "tags": ["a"]}


def test_a_submitted_job_is_committed_to_postgres_and_marked_dispatched(
    client: TestClient, key: str, db: Engine
) -> None:
    job = submit(client, key, num_images=2, width=768, height=512)
    row = job_row(db, job["id"])
    assert row is not None
    assert row["tenant_id"] == tenant_of(db, key)
    assert row["status"] == "queued"
    assert row["queue"] == "generate"
    assert row["request"] == job["request"]
    assert row["cost_tokens"] == (768 // 16) * (512 // 16) * 2
    assert row["attempt"] == 0
    assert row["dispatched_at"] is not None


def test_a_submitted_job_is_published_to_its_redis_queue(
    client: TestClient, key: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    broker_list = f"{redis_prefix}generate"
    before = redis_client.llen(broker_list)
    job = submit(client, key)
    assert redis_client.llen(broker_list) == before + 1
    head = redis_client.lindex(broker_list, 0)
    assert isinstance(head, bytes)
    task, args = decode(head)  # LPUSH: the newest message is at the head
    assert task == "zimage.run_batch"
    assert args == [job["id"]]


def test_get_answers_the_job(client: TestClient, key: str) -> None:
    job = submit(client, key, metadata={"n": 1})
    got = get(client, key, job["id"])
    assert set(got) >= JOB_KEYS
    for field in ("id", "status", "kind", "request", "priority", "metadata", "created_at", "outputs"):
        assert got[field] == job[field]
    assert got["queue_position"] == job["queue_position"]  # nothing was queued in between


def test_an_unknown_job_is_404(client: TestClient, key: str) -> None:
    assert_error(client.get(f"/v1/jobs/{ids.job_id()}", headers=auth(key)), 404, "not_found")
    assert_error(client.get("/v1/jobs/not-even-an-id", headers=auth(key)), 404, "not_found")
    assert_error(client.post(f"/v1/jobs/{ids.job_id()}/cancel", headers=auth(key)), 404, "not_found")


def test_another_tenants_job_answers_exactly_like_an_unknown_one(
    client: TestClient, new_key: Callable[..., str], db: Engine
) -> None:
    owner, other = new_key(), new_key()
    job_id = submit(client, owner)["id"]
    unknown_id = ids.job_id()
    for method, path in (("GET", "/v1/jobs/{}"), ("POST", "/v1/jobs/{}/cancel")):
        theirs = client.request(method, path.format(job_id), headers=auth(other))
        unknown = client.request(method, path.format(unknown_id), headers=auth(other))
        assert_error(theirs, 404, "not_found")
        assert_error(unknown, 404, "not_found")
        assert theirs.json() == json.loads(unknown.text.replace(unknown_id, job_id))
    assert job_status(db, job_id) == "queued"  # the cancel did nothing


# --- auth -------------------------------------------------------------------------------------------------

ENDPOINTS = [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/job_x"), ("POST", "/v1/jobs/job_x/cancel")]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_missing_key_is_401(client: TestClient, method: str, path: str) -> None:
    r = client.request(method, path, json={"prompt": "x"} if method == "POST" else None)
    assert_error(r, 401, "unauthorized")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "{key}", "Token {key}", "Bearer{key}"],
    ids=["basic", "bearer-only", "bearer-blank", "no-scheme", "token-scheme", "no-space"],
)
def test_a_malformed_authorization_header_is_401(client: TestClient, key: str, header: str) -> None:
    r = client.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": header.format(key=key)})
    assert_error(r, 401, "unauthorized")


def test_an_unknown_key_is_401(client: TestClient, key: str) -> None:
    assert_error(client.get("/v1/jobs", headers=auth("zk_" + "A" * 43)), 401, "unauthorized")
    assert_error(client.get("/v1/jobs", headers=auth(key + "x")), 401, "unauthorized")


def test_a_revoked_key_is_401_and_the_tenants_other_keys_still_work(
    client: TestClient, new_key: Callable[..., str], settings: Settings, db: Engine
) -> None:
    tenant_name = f"revoke-{ids.job_id()}"
    revoked, kept = new_key(tenant_name), new_key(tenant_name)
    assert revoke_key(settings, revoked)
    r = client.post("/v1/jobs", json={"prompt": "x"}, headers=auth(revoked))
    assert_error(r, 401, "unauthorized")
    assert count_jobs(db, tenant_of(db, kept)) == 0  # nothing was written for it
    job = submit(client, kept)
    assert page(client, kept)["data"][0]["id"] == job["id"]


def test_a_revoked_key_stops_working_when_its_cache_entry_expires(
    settings: Settings, new_key: Callable[..., str]
) -> None:
    key = new_key()

    async def scenario() -> None:
        engine = make_async_engine(settings)
        try:
            cache = KeyCache(engine, ttl_s=0.3)
            tenant = await cache.tenant_for(key)
            assert tenant is not None and tenant.startswith("ten_")
            assert await cache.tenant_for("zk_unknown") is None
            assert revoke_key(settings, key)
            assert await cache.tenant_for(key) == tenant  # within the cache TTL: still recognised
            await asyncio.sleep(0.4)
            assert await cache.tenant_for(key) is None  # after it: refused
        finally:
            await engine.dispose()

    asyncio.run(scenario())


# --- bad bodies -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"prompt": "x",}', b'{"prompt": "x"', b"\xff\xfe", b""],
    ids=["garbage", "trailing-comma", "truncated", "not-utf8", "empty"],
)
def test_a_body_that_is_not_json_is_400(client: TestClient, key: str, body: bytes) -> None:
    r = client.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")


def test_a_422_names_every_bad_field(client: TestClient, key: str, db: Engine) -> None:
    body = {"prompt": "   ", "width": 1000, "steps": 0, "seed": True, "height": "512", "priority": 10, "colour": "red"}
    error = assert_error(client.post("/v1/jobs", json=body, headers=auth(key)), 422, "validation_error")
    fields = {d["field"] for d in error["details"]}
    assert fields == {"prompt", "width", "steps", "seed", "height", "priority", "colour"}
    assert all(isinstance(d["message"], str) and d["message"] for d in error["details"])
    assert {d["message"] for d in error["details"] if d["field"] == "colour"} == {"unknown field"}
    assert count_jobs(db, tenant_of(db, key)) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "x", "num_images": 9}, "num_images"),
        ({"prompt": "x", "output_quality": 0}, "output_quality"),
        ({"prompt": "x", "metadata": {"k": "v" * 4100}}, "metadata"),
        ({"prompt": "x", "webhook_url": "http://hooks.example.com/x"}, "webhook_url"),
        ({"prompt": "x", "input_images": [{"upload_id": "upl_0123456789abcdef"}]}, "input_images"),
        ({"prompt": "x", "mode": "img2img"}, "mode"),
        ({"prompt": "x", "width": 4096}, "width"),
    ],
    ids=["missing-prompt", "long-prompt", "num_images", "quality", "metadata", "webhook", "images", "mode", "width"],
)
def test_each_field_rule_is_a_422_naming_the_field(
    client: TestClient, key: str, body: dict[str, Any], field: str
) -> None:
    error = assert_error(client.post("/v1/jobs", json=body, headers=auth(key)), 422, "validation_error")
    assert field in {d["field"] for d in error["details"]}


def test_an_adapter_the_tenant_does_not_have_is_a_422_and_creates_nothing(
    client: TestClient, key: str, db: Engine
) -> None:
    extra = {"loras": [{"adapter_id": "lora_0123456789abcdef"}]}
    r = client.post("/v1/jobs", json={"prompt": "a lighthouse at dusk", **extra}, headers=auth(key))
    error = assert_error(r, 422, "validation_error")
    assert error["details"] == [{"field": "loras.0.adapter_id", "message": "no such adapter for this tenant"}]
    assert count_jobs(db, tenant_of(db, key)) == 0


def test_a_body_over_the_limit_is_413(client: TestClient, key: str, settings: Settings, db: Engine) -> None:
    body = json.dumps({"prompt": "x", "metadata": {"pad": "p" * settings.max_body_bytes}}).encode()
    r = client.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert count_jobs(db, tenant_of(db, key)) == 0


def test_a_body_of_exactly_the_limit_is_read(client: TestClient, key: str, settings: Settings) -> None:
    body = b'{"prompt": "x"}'
    body += b" " * (settings.max_body_bytes - len(body))
    assert len(body) == settings.max_body_bytes
    r = client.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
    assert r.status_code == 202, r.text


def test_a_chunked_body_over_the_limit_is_413(client: TestClient, key: str, settings: Settings) -> None:
    def chunks():
        yield b'{"prompt": "x", "metadata": {"pad": "'
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b"p" * 65536
        yield b'"}}'

    r = client.post("/v1/jobs", content=chunks(), headers={**auth(key), "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt": "a\\u0000b"}', "prompt"),
        (b'{"prompt": "x", "negative_prompt": "a\\u0000"}', "negative_prompt"),
        (b'{"prompt": "x", "metadata": {"a": "\\u0000"}}', "metadata"),
        (b'{"prompt": "x", "metadata": {"a\\u0000": 1}}', "metadata"),
    ],
    ids=["prompt", "negative_prompt", "metadata-value", "metadata-key"],
)
def test_a_nul_character_is_a_422_not_a_500(client: TestClient, key: str, db: Engine, body: bytes, field: str) -> None:
    r = client.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
    error = assert_error(r, 422, "validation_error")
    assert any(d["field"].startswith(field) for d in error["details"]), error
    assert count_jobs(db, tenant_of(db, key)) == 0


def test_deeply_nested_metadata_is_echoed_or_refused_never_a_500(client: TestClient, key: str) -> None:
    depth = 300
    body = b'{"prompt": "x", "metadata": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    assert len(body) < 4096
    r = client.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
    assert r.status_code in (202, 422), r.text
    if r.status_code == 422:
        assert [d["field"] for d in assert_error(r, 422, "validation_error")["details"]] == ["metadata"]
    else:
        assert r.json()["metadata"] == json.loads(body)["metadata"]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused_not_turned_into_null(
    client: TestClient, key: str, db: Engine, literal: bytes
) -> None:
    body = b'{"prompt": "x", "metadata": {"score": ' + literal + b"}}"
    r = client.post("/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert_error(r, r.status_code, "bad_request" if r.status_code == 400 else "validation_error")
    assert count_jobs(db, tenant_of(db, key)) == 0


# --- idempotency ------------------------------------------------------------------------------------------


def idem(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def test_the_same_key_and_body_return_the_original_job(
    client: TestClient, key: str, db: Engine, redis_client: redis.Redis, redis_prefix: str
) -> None:
    ikey = f"order-{ids.job_id()}"
    broker_list = f"{redis_prefix}generate"
    first = client.post("/v1/jobs", json={"prompt": "a fox", "width": 512}, headers={**auth(key), **idem(ikey)})
    assert first.status_code == 202, first.text
    depth = redis_client.llen(broker_list)
    # the same request, written differently (key order, surrounding spaces)
    again = client.post("/v1/jobs", json={"width": 512, "prompt": " a fox "}, headers={**auth(key), **idem(ikey)})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["request"] == first.json()["request"]  # the seed chosen the first time
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    assert count_jobs(db, tenant_of(db, key)) == 1
    assert redis_client.llen(broker_list) == depth  # not published twice


def test_the_same_key_with_another_body_is_422(client: TestClient, key: str, db: Engine) -> None:
    ikey = f"order-{ids.job_id()}"
    first = client.post("/v1/jobs", json={"prompt": "a fox"}, headers={**auth(key), **idem(ikey)})
    assert first.status_code == 202, first.text
    r = client.post("/v1/jobs", json={"prompt": "a wolf"}, headers={**auth(key), **idem(ikey)})
    error = assert_error(r, 422, "validation_error")
    assert [d["field"] for d in error["details"]] == ["Idempotency-Key"]
    assert count_jobs(db, tenant_of(db, key)) == 1


def test_an_idempotency_key_is_scoped_to_its_tenant(client: TestClient, new_key: Callable[..., str]) -> None:
    a, b = new_key(), new_key()
    ikey = f"shared-{ids.job_id()}"
    ra = client.post("/v1/jobs", json={"prompt": "a fox"}, headers={**auth(a), **idem(ikey)})
    rb = client.post("/v1/jobs", json={"prompt": "a wolf"}, headers={**auth(b), **idem(ikey)})
    assert (ra.status_code, rb.status_code) == (202, 202), (ra.text, rb.text)
    assert ra.json()["id"] != rb.json()["id"]


def test_an_idempotency_key_of_255_characters_is_accepted(client: TestClient, key: str) -> None:
    r = client.post("/v1/jobs", json={"prompt": "x"}, headers={**auth(key), **idem("k" * 255)})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("value", ["k" * 256, "k" * 1000], ids=["256", "1000"])
def test_an_idempotency_key_over_255_characters_is_422(client: TestClient, key: str, db: Engine, value: str) -> None:
    r = client.post("/v1/jobs", json={"prompt": "x"}, headers={**auth(key), **idem(value)})
    error = assert_error(r, 422, "validation_error")
    assert [d["field"] for d in error["details"]] == ["Idempotency-Key"]
    assert count_jobs(db, tenant_of(db, key)) == 0


def _wait_for_blocked_insert(db: Engine, first: Future[Any], timeout_s: float = 5.0) -> None:
    """Wait until the first request sits in its INSERT, blocked by the table lock (so it holds its key)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if first.done():
            pytest.fail(f"the first request did not wait for the lock: {first.result().status_code}")
        with db.connect() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO jobs%'"
                )
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    pytest.fail("the first request never reached its INSERT")


def test_the_same_key_while_the_first_request_is_being_written_is_409(client: TestClient, key: str, db: Engine) -> None:
    ikey = f"slow-{ids.job_id()}"
    headers = {**auth(key), **idem(ikey)}
    pool = ThreadPoolExecutor(max_workers=1)
    blocker = db.connect()
    try:
        # Hold the first request inside its transaction: its INSERT waits on this lock (reads still pass).
        blocker.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
        first = pool.submit(client.post, "/v1/jobs", json={"prompt": "a fox"}, headers=headers)
        _wait_for_blocked_insert(db, first)
        second = client.post("/v1/jobs", json={"prompt": "a fox"}, headers=headers)
    finally:
        blocker.rollback()
        blocker.close()
    first_response = first.result(timeout=30)
    pool.shutdown()
    assert_error(second, 409, "conflict")
    assert first_response.status_code == 202, first_response.text
    assert count_jobs(db, tenant_of(db, key)) == 1


# --- listing ----------------------------------------------------------------------------------------------


def test_listing_is_newest_first_and_the_cursor_walks_every_job_once(client: TestClient, key: str) -> None:
    made = [submit(client, key, metadata={"n": i})["id"] for i in range(5)]
    seen: list[str] = []
    sizes = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        body = page(client, key, **params)
        sizes.append(len(body["data"]))
        seen += [j["id"] for j in body["data"]]
        assert all(set(j) >= JOB_KEYS for j in body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sizes == [2, 2, 1]
    assert seen == list(reversed(made))


def test_a_page_with_room_to_spare_has_no_next_cursor(client: TestClient, key: str) -> None:
    made = [submit(client, key)["id"] for _ in range(3)]
    body = page(client, key)
    assert [j["id"] for j in body["data"]] == list(reversed(made))
    assert body["next_cursor"] is None
    exact = page(client, key, limit=3)
    assert len(exact["data"]) == 3 and exact["next_cursor"] is None


def test_an_empty_listing(client: TestClient, key: str) -> None:
    assert page(client, key) == {"data": [], "next_cursor": None}


def test_listing_filters_by_status(client: TestClient, key: str) -> None:
    a, b, c = (submit(client, key)["id"] for _ in range(3))
    assert client.post(f"/v1/jobs/{b}/cancel", headers=auth(key)).status_code == 200
    assert [j["id"] for j in page(client, key, status="canceled")["data"]] == [b]
    assert [j["id"] for j in page(client, key, status="queued")["data"]] == [c, a]
    assert page(client, key, status="succeeded")["data"] == []
    assert all(j["status"] == "queued" for j in page(client, key, status="queued")["data"])


def test_listing_shows_only_the_tenants_own_jobs(client: TestClient, new_key: Callable[..., str]) -> None:
    a, b = new_key(), new_key()
    mine = {submit(client, a)["id"] for _ in range(2)}
    theirs = {submit(client, b)["id"] for _ in range(2)}
    assert {j["id"] for j in page(client, a, limit=100)["data"]} == mine
    assert {j["id"] for j in page(client, b, limit=100)["data"]} == theirs


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "done"}, "status"),
        ({"status": "QUEUED"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "garbage!!"}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"bat_123").decode()}, "cursor"),
    ],
    ids=["status", "status-case", "limit-0", "limit-101", "limit-text", "cursor", "cursor-not-a-job"],
)
def test_bad_listing_parameters_are_422(client: TestClient, key: str, params: dict[str, Any], field: str) -> None:
    error = assert_error(client.get("/v1/jobs", params=params, headers=auth(key)), 422, "validation_error")
    assert field in {d["field"] for d in error["details"]}


def test_a_limit_of_100_is_allowed(client: TestClient, key: str) -> None:
    submit(client, key)
    assert len(page(client, key, limit=100)["data"]) == 1


# --- cancel -----------------------------------------------------------------------------------------------


def test_cancel_of_a_queued_job(client: TestClient, key: str, db: Engine) -> None:
    job = submit(client, key)
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key))
    assert r.status_code == 200, r.text
    canceled = r.json()
    assert set(canceled) >= JOB_KEYS
    assert canceled["id"] == job["id"]
    assert canceled["status"] == "canceled"
    assert canceled["queue_position"] is None
    assert RFC3339_UTC.match(canceled["finished_at"])
    assert get(client, key, job["id"])["status"] == "canceled"
    assert job_status(db, job["id"]) == "canceled"


def test_cancel_again_is_409(client: TestClient, key: str) -> None:
    job = submit(client, key)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).status_code == 200
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)), 409, "conflict")


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_of_a_finished_job_is_409(client: TestClient, key: str, db: Engine, status: str) -> None:
    job = submit(client, key)
    set_status(db, job["id"], f"status = '{status}', attempt = 1, finished_at = clock_timestamp()")
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)), 409, "conflict")
    assert job_status(db, job["id"]) == status


def test_cancel_of_a_running_job(client: TestClient, key: str, db: Engine) -> None:
    job = submit(client, key)
    set_status(
        db,
        job["id"],
        "status = 'running', attempt = 1, worker_id = 'test-worker', started_at = clock_timestamp(), "
        "lease_expires_at = clock_timestamp() + interval '5 minutes', progress_step = 3, progress_total = 8",
    )
    running = get(client, key, job["id"])
    assert running["status"] == "running"
    assert running["progress"] == {"step": 3, "total": 8}
    assert running["queue_position"] is None
    assert running["attempts"] == 1
    assert RFC3339_UTC.match(running["started_at"])

    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"
    assert r.json()["progress"] is None
    row = job_row(db, job["id"])
    assert row is not None
    assert row["status"] == "canceled"
    assert row["lease_expires_at"] is None
    assert row["finished_at"] is not None


def test_a_failed_job_shows_its_error_and_no_progress(client: TestClient, key: str, db: Engine) -> None:
    job = submit(client, key)
    set_status(
        db,
        job["id"],
        "status = 'failed', attempt = 1, error_code = 'out_of_memory', error_message = 'one image does not fit', "
        "started_at = clock_timestamp(), finished_at = clock_timestamp()",
    )
    failed = get(client, key, job["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "out_of_memory", "message": "one image does not fit"}
    assert failed["progress"] is None
    assert failed["queue_position"] is None
    assert failed["outputs"] == []
    assert RFC3339_UTC.match(failed["finished_at"])


def test_a_succeeded_job_lists_its_outputs_with_presigned_urls(
    client: TestClient, key: str, db: Engine, settings: Settings
) -> None:
    job = submit(client, key, width=512, height=512, seed=42)
    out = {"index": 0, "key": f"results/t/{job['id']}/0.png", "width": 512, "height": 512, "seed": 42,
           "format": "png", "bytes": 1234, "sha256": "ab" * 32}  # fmt: skip
    with db.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET status = 'succeeded', attempt = 1, outputs = CAST(:o AS jsonb), "
                "timings = CAST(:t AS jsonb), started_at = clock_timestamp(), finished_at = clock_timestamp() "
                "WHERE id = :id"
            ),
            {
                "o": json.dumps([out]),
                "t": json.dumps({"queued_ms": 5, "inference_ms": 80, "upload_ms": 3, "total_ms": 90}),
                "id": job["id"],
            },
        )
    done = get(client, key, job["id"])
    assert done["status"] == "succeeded"
    assert done["error"] is None and done["progress"] is None and done["queue_position"] is None
    assert done["timings"] == {"queued_ms": 5, "inference_ms": 80, "upload_ms": 3, "total_ms": 90}
    [output] = done["outputs"]
    assert {k: output[k] for k in out} == out
    assert output["url"].startswith(str(settings.presign_endpoint))
    assert out["key"] in output["url"] and "Signature" in output["url"]
    assert RFC3339_UTC.match(output["url_expires_at"])


# --- queue position ---------------------------------------------------------------------------------------


def test_queue_position_puts_higher_priority_first_then_oldest(client: TestClient, key: str) -> None:
    a = submit(client, key, priority=5)["id"]
    b = submit(client, key, priority=9)["id"]
    c = submit(client, key, priority=5)["id"]
    d = submit(client, key, priority=0)["id"]
    pos = {j: get(client, key, j)["queue_position"] for j in (a, b, c, d)}
    assert pos[b] < pos[a]  # higher priority runs first, though submitted later
    assert pos[c] == pos[a] + 1  # same priority: the older one first
    assert pos[d] > pos[c]
    assert client.post(f"/v1/jobs/{b}/cancel", headers=auth(key)).status_code == 200
    assert get(client, key, a)["queue_position"] == pos[a] - 1  # one fewer job ahead


def test_queue_position_counts_only_the_tenants_own_jobs(client: TestClient, key: str, new_key: Any) -> None:
    # Claims share the accelerators between tenants fairly: another tenant's backlog is not ahead of this job.
    for _ in range(3):
        submit(client, key)
    newcomer = new_key()
    first = submit(client, newcomer)
    assert first["queue_position"] == 0 and get(client, newcomer, first["id"])["queue_position"] == 0
    assert submit(client, newcomer)["queue_position"] == 1


# --- health, readiness, docs, error bodies ----------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_with_every_dependency_up(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"postgres": "ok", "redis": "ok", "s3": "ok"}


def test_openapi_lists_the_paths_and_docs_answer(client: TestClient) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert {"post", "get"} <= set(paths["/v1/jobs"])
    assert "get" in paths["/v1/jobs/{job_id}"]
    assert "post" in paths["/v1/jobs/{job_id}/cancel"]
    assert "get" in paths["/healthz"] and "get" in paths["/readyz"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]


def test_unknown_routes_and_methods_have_the_error_body(client: TestClient, key: str) -> None:
    assert_error(client.get("/v1/nothing-here", headers=auth(key)), 404, "not_found")
    error = assert_error(client.delete("/v1/jobs", headers=auth(key)), 405, "method_not_allowed")
    assert error["details"] == []
