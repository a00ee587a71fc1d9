"""Jobs that name adapters, on the real app and Postgres: only the tenant's own adapters (one query per job or
batch), stored sorted so equal sets make equal requests, group keys and reuse keys; no adapter deleted while a
queued or running job names it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.main import create_app
from core.admin import create_key
from core.apikeys import hash_key
from core.settings import Settings
from deploy.tiny_adapter import build_tiny_adapter
from tests.helpers.api import auth


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_sweeper=False)) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(tiny_turbo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_tiny_adapter(tiny_turbo_dir, tmp_path_factory.mktemp("adapters") / "tiny.safetensors").read_bytes()


def new_adapter(client: TestClient, key: str, data: bytes) -> str:
    response = client.post("/v1/adapters", files={"file": ("a.safetensors", data)}, headers=auth(key))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def tenant_of(db: Engine, key: str) -> str:
    with db.connect() as conn:
        return str(
            conn.execute(text("SELECT tenant_id FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}).scalar_one()
        )


def job_row(db: Engine, job_id: str) -> Any:
    with db.connect() as conn:
        return conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()


def count(db: Engine, table: str, tenant: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table} WHERE tenant_id = :t"), {"t": tenant}).scalar_one())


def error_of(response: Any, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return dict(response.json()["error"])


@pytest.fixture(scope="module")
def owner(client: TestClient, settings: Settings, tiny: bytes) -> tuple[str, str, str]:
    """A tenant's key and two of its adapters, the first id sorting first."""
    key = create_key(settings, f"adapter-owner-{secrets.token_hex(4)}")
    first, second = sorted(new_adapter(client, key, tiny) for _ in range(2))
    return key, first, second


@pytest.mark.parametrize("idempotency", [False, True], ids=["group-commit", "idempotent"])
def test_a_job_with_adapters_is_stored_with_them_sorted(
    client: TestClient, db: Engine, owner: tuple[str, str, str], idempotency: bool
) -> None:
    key, first, second = owner
    loras = [{"adapter_id": second, "scale": 0.5}, {"adapter_id": first}]
    headers = {**auth(key), **({"Idempotency-Key": f"lora-{second}"} if idempotency else {})}
    response = client.post("/v1/jobs", json={"prompt": "a fox", "loras": loras}, headers=headers)
    assert response.status_code == 202, response.text
    job = response.json()
    stored = [{"adapter_id": first, "scale": 1.0}, {"adapter_id": second, "scale": 0.5}]
    assert job["request"]["loras"] == stored
    row = job_row(db, job["id"])
    assert row["request"]["loras"] == stored
    assert row["group_key"].endswith(f"|{first}:1,{second}:0.5")
    if idempotency:  # the same adapters in the other order are the same request: a replay
        again = client.post("/v1/jobs", json={"prompt": "a fox", "loras": loras[::-1]}, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == job["id"]


def test_equal_adapter_sets_share_group_and_reuse_keys(
    client: TestClient, db: Engine, owner: tuple[str, str, str]
) -> None:
    key, first, second = owner
    body = {"prompt": "a fox", "seed": 3, "reuse": True}
    a, b = ({"adapter_id": first, "scale": 0.25}, {"adapter_id": second})
    ids = [
        client.post("/v1/jobs", json={**body, "loras": loras}, headers=auth(key)).json()["id"]
        for loras in ([a, b], [b, a], [a, {**b, "scale": 0.5}])
    ]
    rows = [job_row(db, i) for i in ids]
    assert rows[0]["group_key"] == rows[1]["group_key"] != rows[2]["group_key"]
    assert rows[0]["reuse_key"] == rows[1]["reuse_key"] != rows[2]["reuse_key"]


def test_job_adapter_rules_are_422(client: TestClient, owner: tuple[str, str, str]) -> None:
    key, first, _ = owner
    twice = [{"adapter_id": first}, {"adapter_id": first, "scale": 2}]
    error = error_of(client.post("/v1/jobs", json={"prompt": "x", "loras": twice}, headers=auth(key)))
    assert [d["field"] for d in error["details"]] == ["loras"] and "twice" in error["details"][0]["message"]
    four = [{"adapter_id": first}] * 4
    assert "loras" in {
        d["field"]
        for d in error_of(client.post("/v1/jobs", json={"prompt": "x", "loras": four}, headers=auth(key)))["details"]
    }
    instruct = {
        "prompt": "x",
        "kind": "edit",
        "mode": "instruct",
        "input_images": [{"upload_id": "upl_0123456789abcdef"}],
    }
    error = error_of(client.post("/v1/jobs", json={**instruct, "loras": [{"adapter_id": first}]}, headers=auth(key)))
    assert "loras" in {d["field"] for d in error["details"]}


def test_an_img2img_edit_takes_adapters(client: TestClient, owner: tuple[str, str, str]) -> None:
    import io

    from PIL import Image

    key, first, _ = owner
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    upload = client.post("/v1/uploads", files={"file": ("a.png", png.getvalue(), "image/png")}, headers=auth(key))
    body = {
        "kind": "edit",
        "mode": "img2img",
        "prompt": "as ink",
        "input_images": [{"upload_id": upload.json()["id"]}],
        "loras": [{"adapter_id": first, "scale": 0.8}],
    }
    response = client.post("/v1/jobs", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    assert response.json()["request"]["loras"] == [{"adapter_id": first, "scale": 0.8}]


def test_another_tenants_adapter_cannot_be_named(
    client: TestClient, new_key: Any, owner: tuple[str, str, str], db: Engine
) -> None:
    _, first, second = owner
    stranger = new_key()
    for headers in (auth(stranger), {**auth(stranger), "Idempotency-Key": "stranger-1"}):
        body = {"prompt": "x", "loras": [{"adapter_id": "lora_0000000000000000000000zzzz"}, {"adapter_id": first}]}
        error = error_of(client.post("/v1/jobs", json=body, headers=headers))
        assert error["details"] == [
            {"field": "loras.0.adapter_id", "message": "no such adapter for this tenant"},
            {"field": "loras.1.adapter_id", "message": "no such adapter for this tenant"},
        ]
    assert count(db, "jobs", tenant_of(db, stranger)) == 0


def test_a_batch_naming_an_unknown_adapter_is_refused_whole(
    client: TestClient, owner: tuple[str, str, str], new_key: Any, tiny: bytes, db: Engine
) -> None:
    key = new_key()
    mine = new_adapter(client, key, tiny)
    _, someone_elses, _ = owner
    jobs = [
        {"prompt": "a", "loras": [{"adapter_id": mine}]},
        {"prompt": "b"},
        {"prompt": "c", "loras": [{"adapter_id": mine}, {"adapter_id": someone_elses}]},
    ]
    error = error_of(client.post("/v1/batches", json={"jobs": jobs}, headers=auth(key)))
    assert error["details"] == [
        {"index": 2, "field": "loras.1.adapter_id", "message": "no such adapter for this tenant"}
    ]
    assert "nothing was created" in error["message"]
    tenant = tenant_of(db, key)
    assert count(db, "jobs", tenant) == 0 and count(db, "batches", tenant) == 0
    accepted = client.post("/v1/batches", json={"jobs": jobs[:2], "defaults": {"seed": 1}}, headers=auth(key))
    assert accepted.status_code == 202, accepted.text
    with db.connect() as conn:
        stored = (
            conn.execute(
                text("SELECT request->'loras' FROM jobs WHERE tenant_id = :t ORDER BY batch_index"), {"t": tenant}
            )
            .scalars()
            .all()
        )
    assert stored == [[{"adapter_id": mine, "scale": 1.0}], []]


def test_an_adapter_in_use_by_a_queued_or_running_job_cannot_be_deleted(
    client: TestClient, new_key: Any, tiny: bytes, db: Engine
) -> None:
    key = new_key()
    used, unused = new_adapter(client, key, tiny), new_adapter(client, key, tiny)
    job = client.post("/v1/jobs", json={"prompt": "x", "loras": [{"adapter_id": used}]}, headers=auth(key)).json()
    error = error_of(client.delete(f"/v1/adapters/{used}", headers=auth(key)), 409)
    assert error["code"] == "conflict" and job["id"] in error["message"]
    assert client.delete(f"/v1/adapters/{unused}", headers=auth(key)).status_code == 204
    with db.begin() as conn:  # claimed by a worker
        conn.execute(text("UPDATE jobs SET status = 'running', attempt = 1 WHERE id = :id"), {"id": job["id"]})
    assert error_of(client.delete(f"/v1/adapters/{used}", headers=auth(key)), 409)["code"] == "conflict"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).json()["status"] == "canceled"
    assert client.delete(f"/v1/adapters/{used}", headers=auth(key)).status_code == 204
    assert client.get(f"/v1/adapters/{used}", headers=auth(key)).status_code == 404
