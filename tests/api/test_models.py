"""GET /v1/models (the served models, their defaults and limits, and whether a worker is up) and the 422 / wait
answers of a job naming a model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.main import create_app
from core.settings import Settings
from tests.helpers.api import auth


@pytest.fixture(scope="module")
def base_client(settings: Settings) -> Iterator[TestClient]:
    """An app whose settings name Base weights (the worker side is faked with rows of the workers table)."""
    served = settings.model_copy(update={"base_model": "some/base-weights", "worker_heartbeat_s": 5.0})
    with TestClient(create_app(served, run_sweeper=False)) as c:
        yield c


def _worker(db: Engine, queues: str, *, ready: bool = True, age_s: float = 0.0) -> str:
    worker_id = f"test-models-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO workers (id, hostname, pid, queues, ready, last_seen_at)"
                " VALUES (:id, 'h', 1, :q, :ready, now() - make_interval(secs => :age))"
            ),
            {"id": worker_id, "q": queues, "ready": ready, "age": age_s},
        )
    return worker_id


def _live_base_workers(db: Engine) -> bool:
    with db.connect() as conn:
        n = conn.scalar(
            text(
                "SELECT count(*) FROM workers WHERE ready AND ',' || queues || ',' LIKE '%,base,%'"
                " AND last_seen_at > now() - interval '15 seconds'"
            )
        )
    return bool(n)


def test_models_lists_what_the_settings_serve(client: TestClient, base_client: TestClient, key: str) -> None:
    plain = client.get("/v1/models", headers=auth(key))
    assert plain.status_code == 200, plain.text
    assert [m["id"] for m in plain.json()["data"]] == ["z-image-turbo"]
    body = base_client.get("/v1/models", headers=auth(key)).json()
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {"z-image-turbo", "z-image-base"}
    base = models["z-image-base"]
    assert base["defaults"] == {"steps": 28, "guidance_scale": 4.0}
    assert base["limits"] == {"steps": [1, 100], "guidance_scale": [0.0, 20.0]}
    assert base["negative_prompt"] is True and base["queue"] == "base"
    assert models["z-image-turbo"]["defaults"] == {"steps": 8, "guidance_scale": 0.0}


def test_models_need_a_key(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401


def test_available_follows_live_ready_workers(base_client: TestClient, key: str, db: Engine) -> None:
    def available() -> bool:
        data = base_client.get("/v1/models", headers=auth(key)).json()["data"]
        return {m["id"]: m["available"] for m in data}["z-image-base"]

    assert available() == _live_base_workers(db)
    _worker(db, "base", age_s=60)  # stale: its worker stopped beating
    _worker(db, "generate,base", ready=False)
    assert available() == _live_base_workers(db)
    _worker(db, "edit,base")  # a live worker serving base among other queues
    assert available() is True


def test_a_model_no_setting_names_is_422(client: TestClient, key: str) -> None:
    r = client.post("/v1/jobs", json={"prompt": "a fox", "model": "z-image-base"}, headers=auth(key))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"] == [
        {"field": "model", "message": "z-image-base is not served here: ZIMAGE_BASE_MODEL is unset"}
    ]
    batch = client.post(
        "/v1/batches", json={"jobs": [{"prompt": "a"}, {"prompt": "b", "model": "z-image-base"}]}, headers=auth(key)
    )
    assert batch.status_code == 422, batch.text
    assert [(d["index"], d["field"]) for d in batch.json()["error"]["details"]] == [(1, "model")]


def test_a_served_model_without_workers_is_accepted_and_waits(base_client: TestClient, key: str, db: Engine) -> None:
    r = base_client.post(
        "/v1/jobs",
        json={"prompt": "a fox", "model": "z-image-base", "negative_prompt": "blurry", "width": 512, "height": 512},
        headers=auth(key),
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert (job["request"]["model"], job["request"]["steps"], job["request"]["guidance_scale"]) == (
        "z-image-base",
        28,
        4.0,
    )
    with db.connect() as conn:
        row = conn.execute(text("SELECT queue, cost_tokens FROM jobs WHERE id = :id"), {"id": job["id"]}).one()
    assert (row.queue, row.cost_tokens) == ("base", 2 * 32 * 32)
