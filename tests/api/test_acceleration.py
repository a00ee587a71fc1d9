"""A job's ``acceleration`` (fast mode): accepted for text to image on Turbo and Base, refused with 422 where the
model or kind has none, stored in the request, and its own group and reuse keys (fast and exact jobs never share
a batch or each other's results)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.main import create_app
from core.settings import Settings
from tests.helpers.api import auth

IMAGE = [{"url": "https://example.com/in.png"}]


@pytest.fixture(scope="module")
def base_client(settings: Settings) -> Iterator[TestClient]:
    served = settings.model_copy(update={"base_model": "some/base-weights", "edit_model": "some/edit-weights"})
    with TestClient(create_app(served, run_sweeper=False)) as c:
        yield c


def _row(db: Engine, job_id: str) -> Any:
    with db.connect() as conn:
        return conn.execute(text("SELECT group_key, reuse_key, request FROM jobs WHERE id = :id"), {"id": job_id}).one()


@pytest.mark.parametrize("model", ["z-image-turbo", "z-image-base"])
def test_fast_mode_is_stored_and_keyed_apart(base_client: TestClient, key: str, db: Engine, model: str) -> None:
    body = {"prompt": "a fox", "model": model, "seed": 5, "reuse": True, "width": 512, "height": 512}
    fast = base_client.post("/v1/jobs", json={**body, "acceleration": "cache"}, headers=auth(key))
    exact = base_client.post("/v1/jobs", json={**body, "acceleration": "none"}, headers=auth(key))
    assert fast.status_code == exact.status_code == 202, (fast.text, exact.text)
    assert fast.json()["request"]["acceleration"] == "cache"
    assert "acceleration" not in exact.json()["request"]  # none: stored as every earlier job was
    f, e = _row(db, fast.json()["id"]), _row(db, exact.json()["id"])
    assert f.request["acceleration"] == "cache"
    assert f.group_key != e.group_key and f.group_key.endswith("|cache")
    assert f.reuse_key != e.reuse_key and None not in (f.reuse_key, e.reuse_key)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "edit", "mode": "img2img", "input_images": IMAGE}, "generate jobs only"),
        ({"kind": "edit", "mode": "inpaint", "input_images": IMAGE, "mask": IMAGE[0]}, "generate jobs only"),
        ({"kind": "edit", "mode": "instruct", "input_images": IMAGE}, "z-image-edit has no fast mode"),
    ],
)
def test_fast_mode_is_refused_where_it_is_not_offered(
    base_client: TestClient, key: str, body: dict[str, Any], message: str
) -> None:
    r = base_client.post("/v1/jobs", json={"prompt": "a fox", "acceleration": "cache", **body}, headers=auth(key))
    assert r.status_code == 422, r.text
    (detail,) = r.json()["error"]["details"]
    assert detail["field"] == "acceleration" and message in detail["message"]


def test_unknown_modes_are_refused_and_models_list_theirs(base_client: TestClient, key: str) -> None:
    r = base_client.post("/v1/jobs", json={"prompt": "a fox", "acceleration": "fast"}, headers=auth(key))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "acceleration"
    models = {m["id"]: m for m in base_client.get("/v1/models", headers=auth(key)).json()["data"]}
    assert models["z-image-turbo"]["accelerations"] == models["z-image-base"]["accelerations"] == ["none", "cache"]
    assert models["z-image-edit"]["accelerations"] == ["none"]
