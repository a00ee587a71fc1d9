"""The outbox and the sweeper: a Redis outage loses no job, a Postgres outage writes nothing, expired leases are
requeued or failed, and only one sweeper acts at a time."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.main import create_app
from core import sweeper
from core.apikeys import hash_key
from core.db import make_async_engine
from core.settings import Settings
from core.sweeper import sweep_once
from tests.helpers.api import auth

CLOSED_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused at once
CLOSED_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:1/zimage"


# --- fixtures and helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_settings(settings: Settings) -> Settings:
    """The run's settings, re-publishing undispatched rows however young they are."""
    return settings.model_copy(update={"redispatch_after_s": 0.0})


@pytest.fixture(scope="module")
def redis_down_client(settings: Settings) -> Iterator[TestClient]:
    """The app with Redis unreachable (Postgres and S3 up)."""
    with TestClient(create_app(settings.model_copy(update={"redis_url": CLOSED_REDIS}), run_sweeper=False)) as c:
        yield c


@pytest.fixture
def own_prefix(redis_prefix: str, redis_client: redis.Redis) -> str:
    """A Redis prefix of this test alone, to tell that nothing at all was published under it."""
    return f"{redis_prefix}outbox-{secrets.token_hex(4)}:"


def submit(client: TestClient, key: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("prompt", "a lighthouse at dusk")
    r = client.post("/v1/jobs", json=fields, headers=auth(key))
    assert r.status_code == 202, r.text
    return r.json()


def job_row(db: Engine, job_id: str) -> dict[str, Any]:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one())


def published(redis_client: redis.Redis, prefix: str, queue: str = "generate") -> Counter[str]:
    """How many messages each job id has in a broker list."""
    counts: Counter[str] = Counter()
    for raw in redis_client.lrange(f"{prefix}{queue}", 0, -1):
        msg = json.loads(raw)
        assert msg["headers"]["task"] == "zimage.run_batch"
        args, _, _ = json.loads(base64.b64decode(msg["body"]))
        counts[args[0]] += 1
    return counts


def expire_lease(db: Engine, job_id: str, *, attempt: int, max_attempts: int) -> None:
    """Make ``job_id`` a running job whose worker vanished: its lease ran out a minute ago."""
    with db.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET status = 'running', attempt = :a, max_attempts = :m, worker_id = 'gone-worker', "
                "started_at = clock_timestamp() - interval '6 minutes', progress_step = 4, progress_total = 8, "
                "lease_expires_at = clock_timestamp() - interval '1 minute' WHERE id = :id"
            ),
            {"a": attempt, "m": max_attempts, "id": job_id},
        )


def tenant_of(db: Engine, key: str) -> str:
    with db.connect() as conn:
        return conn.execute(
            text("SELECT tenant_id FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}
        ).scalar_one()


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert set(response.json()["error"]) == {"code", "message", "details"}
    assert int(response.headers["retry-after"]) > 0


# --- Redis down at submit ---------------------------------------------------------------------------------


def test_redis_down_at_submit_loses_nothing(
    redis_down_client: TestClient,
    key: str,
    db: Engine,
    redis_client: redis.Redis,
    redis_prefix: str,
    sweep_settings: Settings,
) -> None:
    jobs = [submit(redis_down_client, key, metadata={"n": i})["id"] for i in range(3)]

    # committed, queued, readable, but not in Redis yet
    for job_id in jobs:
        row = job_row(db, job_id)
        assert row["status"] == "queued"
        assert row["dispatched_at"] is None
        assert redis_down_client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["status"] == "queued"
    assert not set(jobs) & set(published(redis_client, redis_prefix))

    # a sweeper that still cannot reach Redis publishes nothing and marks nothing
    dead = redis.Redis.from_url(CLOSED_REDIS, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        with pytest.raises(redis.ConnectionError):
            sweep_once(db, dead, sweep_settings)
    finally:
        dead.close()
    assert all(job_row(db, j)["dispatched_at"] is None for j in jobs)

    # Redis is back: one sweep publishes every one of them, once, and marks them dispatched
    result = sweep_once(db, redis_client, sweep_settings)
    assert result.acted
    assert result.published >= len(jobs)
    counts = published(redis_client, redis_prefix)
    assert all(counts[j] == 1 for j in jobs), counts
    assert all(job_row(db, j)["dispatched_at"] is not None for j in jobs)

    # and the next sweep does not publish them again
    sweep_once(db, redis_client, sweep_settings)
    counts = published(redis_client, redis_prefix)
    assert all(counts[j] == 1 for j in jobs), counts


def test_readyz_names_redis_when_it_is_down(redis_down_client: TestClient) -> None:
    r = redis_down_client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable"
    assert r.json()["error"]["details"] == [{"postgres": "ok", "redis": "down", "s3": "ok"}]
    assert "retry-after" in r.headers


# --- Postgres down ----------------------------------------------------------------------------------------


def test_postgres_down_answers_503_and_publishes_nothing(
    settings: Settings, key: str, own_prefix: str, redis_client: redis.Redis
) -> None:
    down = settings.model_copy(update={"database_url": CLOSED_POSTGRES, "redis_prefix": own_prefix})
    with TestClient(create_app(down, run_sweeper=False)) as c:
        assert_unavailable(c.post("/v1/jobs", json={"prompt": "a fox"}, headers=auth(key)))
        assert_unavailable(c.get("/v1/jobs", headers=auth(key)))
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["details"] == [{"postgres": "down", "redis": "ok", "s3": "ok"}]
        assert c.get("/healthz").status_code == 200  # the process itself is up
    assert list(redis_client.scan_iter(f"{own_prefix}*")) == []


def test_postgres_lost_after_the_key_was_recognised_writes_nothing(
    settings: Settings, key: str, own_prefix: str, redis_client: redis.Redis, db: Engine
) -> None:
    app = create_app(settings.model_copy(update={"redis_prefix": own_prefix}), run_sweeper=False)
    with TestClient(app) as c:
        assert c.get("/v1/jobs", headers=auth(key)).status_code == 200  # the key is now cached
        resources = app.state.resources
        real_db, resources.db = (
            resources.db,
            make_async_engine(settings.model_copy(update={"database_url": CLOSED_POSTGRES})),
        )
        try:
            assert_unavailable(c.post("/v1/jobs", json={"prompt": "a fox"}, headers=auth(key)))
        finally:
            dead_db, resources.db = resources.db, real_db
            assert c.portal is not None
            c.portal.call(dead_db.dispose)
    assert list(redis_client.scan_iter(f"{own_prefix}*")) == []
    with db.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM jobs WHERE tenant_id = :t"), {"t": tenant_of(db, key)})
        assert count.scalar_one() == 0


# --- expired leases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "max_attempts"), [(1, 3), (2, 3), (1, 2)])
def test_an_expired_lease_is_requeued_and_republished(
    client: TestClient,
    key: str,
    db: Engine,
    redis_client: redis.Redis,
    redis_prefix: str,
    sweep_settings: Settings,
    attempt: int,
    max_attempts: int,
) -> None:
    job_id = submit(client, key)["id"]
    expire_lease(db, job_id, attempt=attempt, max_attempts=max_attempts)
    before = published(redis_client, redis_prefix)[job_id]

    result = sweep_once(db, redis_client, sweep_settings)

    assert result.acted and result.requeued >= 1
    row = job_row(db, job_id)
    assert row["status"] == "queued"
    assert row["attempt"] == attempt  # the next claim makes it attempt + 1
    assert row["lease_expires_at"] is None and row["worker_id"] is None
    assert row["progress_step"] is None and row["progress_total"] is None
    assert row["error_code"] is None and row["finished_at"] is None
    assert row["dispatched_at"] is not None
    assert published(redis_client, redis_prefix)[job_id] == before + 1  # a fresh wake-up for a worker
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "queued" and isinstance(job["queue_position"], int) and job["progress"] is None


@pytest.mark.parametrize(("attempt", "max_attempts"), [(3, 3), (1, 1), (4, 3)])
def test_an_expired_lease_on_the_last_attempt_fails_the_job(
    client: TestClient,
    key: str,
    db: Engine,
    redis_client: redis.Redis,
    redis_prefix: str,
    sweep_settings: Settings,
    attempt: int,
    max_attempts: int,
) -> None:
    job_id = submit(client, key)["id"]
    expire_lease(db, job_id, attempt=attempt, max_attempts=max_attempts)
    before = published(redis_client, redis_prefix)[job_id]

    result = sweep_once(db, redis_client, sweep_settings)

    assert result.acted and result.failed >= 1
    row = job_row(db, job_id)
    assert row["status"] == "failed"
    assert row["error_code"] == "max_attempts_exceeded"
    assert row["finished_at"] is not None
    assert row["lease_expires_at"] is None
    assert published(redis_client, redis_prefix)[job_id] == before  # never runs again
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "max_attempts_exceeded" and job["error"]["message"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 409


def test_a_live_lease_is_left_alone(
    client: TestClient, key: str, db: Engine, redis_client: redis.Redis, sweep_settings: Settings
) -> None:
    job_id = submit(client, key)["id"]
    with db.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET status = 'running', attempt = 1, worker_id = 'busy-worker', "
                "lease_expires_at = clock_timestamp() + interval '5 minutes' WHERE id = :id"
            ),
            {"id": job_id},
        )
    sweep_once(db, redis_client, sweep_settings)
    row = job_row(db, job_id)
    assert (row["status"], row["attempt"], row["worker_id"]) == ("running", 1, "busy-worker")


# --- one sweeper at a time --------------------------------------------------------------------------------


def test_only_one_sweeper_acts_while_another_holds_the_lock(
    client: TestClient,
    key: str,
    db: Engine,
    redis_client: redis.Redis,
    redis_prefix: str,
    sweep_settings: Settings,
) -> None:
    job_id = submit(client, key)["id"]
    expire_lease(db, job_id, attempt=1, max_attempts=3)
    before = published(redis_client, redis_prefix)[job_id]

    with db.connect() as other_sweeper:
        # another sweeper is mid-pass: it holds the sweepers' advisory lock in its open transaction
        assert other_sweeper.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": sweeper._LOCK_KEY}).scalar()
        result = sweep_once(db, redis_client, sweep_settings)
        assert result == sweeper.SweepResult(acted=False)
        assert job_row(db, job_id)["status"] == "running"  # untouched
        assert published(redis_client, redis_prefix)[job_id] == before
        other_sweeper.rollback()  # its pass ends

    result = sweep_once(db, redis_client, sweep_settings)
    assert result.acted and result.requeued >= 1
    assert job_row(db, job_id)["status"] == "queued"
    assert published(redis_client, redis_prefix)[job_id] == before + 1


def test_a_batch_committed_while_redis_is_down_runs_once_redis_is_back(
    redis_down_client: TestClient,
    key: str,
    db: Engine,
    redis_client: redis.Redis,
    redis_prefix: str,
    sweep_settings: Settings,
) -> None:
    body = {"jobs": [{"prompt": f"outage batch {i}", "width": 256, "height": 256} for i in range(50)]}
    answer = redis_down_client.post("/v1/batches", json=body, headers=auth(key))
    assert answer.status_code == 202, answer.text  # a Redis outage does not refuse a batch
    with db.connect() as conn:
        ids = list(conn.execute(text("SELECT id FROM jobs WHERE batch_id = :b"), {"b": answer.json()["id"]}).scalars())
    assert len(ids) == 50

    def undispatched() -> int:
        with db.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND dispatched_at IS NULL"), {"ids": ids}
                ).scalar_one()
            )

    # The background publish fails and unmarks them (bounded wait), so the outbox owns them now.
    deadline = time.monotonic() + 20
    while undispatched() < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert undispatched() == 50
    assert not set(ids) & set(published(redis_client, redis_prefix))
    # Redis is back: one sweep publishes each of them once.
    sweep_once(db, redis_client, sweep_settings)
    counts = published(redis_client, redis_prefix)
    assert all(counts[j] == 1 for j in ids) and undispatched() == 0
    with db.begin() as conn:  # these never run here: leave no backlog for later suites' workers
        conn.execute(text("DELETE FROM jobs WHERE id = ANY(:ids)"), {"ids": ids})
