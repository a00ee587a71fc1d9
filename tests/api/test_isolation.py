"""Isolation between tenants: tenant B reaching for anything of tenant A (read, list, cancel, download, events,
manifest, gallery, webhooks, upload, adapter) gets exactly what an unknown id gets, a 404, and changes nothing.

The routes are listed here by hand and checked against the app's own document, so a new route with an id in its
path fails this file until its isolation is tested too.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from core.settings import Settings
from tests.helpers.api import auth

# Every operation with an id in its path: (method, path).
ROUTES = [
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("GET", "/v1/jobs/{job_id}/webhooks"),
    ("GET", "/v1/batches/{batch_id}"),
    ("GET", "/v1/batches/{batch_id}/jobs"),
    ("POST", "/v1/batches/{batch_id}/cancel"),
    ("GET", "/v1/batches/{batch_id}/manifest"),
    ("GET", "/v1/batches/{batch_id}/gallery"),
    ("GET", "/v1/batches/{batch_id}/events"),
    ("GET", "/v1/batches/{batch_id}/webhooks"),
    ("GET", "/v1/uploads/{upload_id}"),
    ("GET", "/v1/adapters/{adapter_id}"),
    ("DELETE", "/v1/adapters/{adapter_id}"),
]


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def _adapter(settings: Settings) -> bytes:
    """A small valid LoRA file for the served (tiny) transformer."""
    from safetensors.torch import save

    from core.adapter_shapes import served_layers
    from deploy.tiny_adapter import random_lora

    return save(random_lora(served_layers(settings), rank=2))


@pytest.fixture(scope="module")
def owned(settings: Settings, new_key_module: Callable[..., str]) -> Iterator[tuple[TestClient, dict[str, str], str]]:
    """Tenant A's job, batch and upload (ids by path parameter), and tenant B's key."""
    a, b = new_key_module(), new_key_module()
    with TestClient(create_app(settings, run_sweeper=False)) as client:
        job = client.post("/v1/jobs", json={"prompt": "tenant a's"}, headers=auth(a)).json()
        batch = client.post("/v1/batches", json={"jobs": [{"prompt": "a1"}, {"prompt": "a2"}]}, headers=auth(a))
        upload = client.post("/v1/uploads", files={"file": ("a.png", _png(), "image/png")}, headers=auth(a))
        adapter = client.post("/v1/adapters", files={"file": ("a.safetensors", _adapter(settings))}, headers=auth(a))
        assert batch.status_code == 202 and upload.status_code == 201, (batch.text, upload.text)
        assert adapter.status_code == 201, adapter.text
        ids = {
            "job_id": job["id"],
            "batch_id": batch.json()["id"],
            "upload_id": upload.json()["id"],
            "adapter_id": adapter.json()["id"],
        }
        yield client, ids, b
        # nothing B did changed anything of A's
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth(a)).json()["status"] == "queued"
        assert client.get(f"/v1/batches/{ids['batch_id']}", headers=auth(a)).json()["status"] == "running"
        assert client.get(f"/v1/adapters/{ids['adapter_id']}", headers=auth(a)).status_code == 200


@pytest.fixture(scope="module")
def new_key_module(settings: Settings) -> Callable[..., str]:
    from core.admin import create_key
    from core.ids import tenant_id

    return lambda: create_key(settings, f"isolation-{tenant_id()}")


def test_every_route_with_an_id_is_listed(settings: Settings) -> None:
    document = create_app(settings).openapi()["paths"]
    with_ids = {(m.upper(), p) for p, ops in document.items() for m in ops if re.search(r"\{\w+\}", p)}
    assert with_ids == set(ROUTES)


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_another_tenants_id_is_404_like_an_unknown_one(
    owned: tuple[TestClient, dict[str, str], str], method: str, path: str
) -> None:
    client, ids, other = owned
    answer = client.request(method, path.format(**ids), headers=auth(other))
    unknown = client.request(method, re.sub(r"\{(\w+)\}", "nope_0", path), headers=auth(other))
    for r in (answer, unknown):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
    param = re.search(r"\{(\w+)\}", path).group(1)  # type: ignore[union-attr]
    assert answer.text.replace(ids[param], "nope_0") == unknown.text  # word for word what an unknown id gets


def test_lists_hold_only_the_callers_own(owned: tuple[TestClient, dict[str, str], str]) -> None:
    client, ids, other = owned
    mine = client.post("/v1/jobs", json={"prompt": "tenant b's"}, headers=auth(other)).json()
    page: dict[str, Any] = client.get("/v1/jobs", params={"limit": 100}, headers=auth(other)).json()
    assert [j["id"] for j in page["data"]] == [mine["id"]]
    filtered = client.get("/v1/jobs", params={"batch_id": ids["batch_id"]}, headers=auth(other)).json()
    assert filtered["data"] == []
