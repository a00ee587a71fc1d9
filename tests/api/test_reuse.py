"""Result reuse through the real app: an identical request of the same tenant that opted in (with a seed) gets
the earlier job's outputs without running; anything that changes the images, or another tenant, misses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from tests.helpers.api import auth

BASE = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 7, "reuse": True}
OUTPUTS = [{"index": 0, "key": "results/t/job/0.png", "width": 256, "height": 256, "seed": 7, "format": "png",
            "bytes": 10, "sha256": "ab" * 32}]  # fmt: skip


@pytest.fixture(autouse=True)
def no_backlog(db: Engine) -> Iterator[None]:
    """These jobs never run: leave no queued job behind for later suites' workers."""
    yield
    with db.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE request->>'prompt' LIKE 'a lighthouse%'"))


def submit(client: TestClient, key: str, **fields: Any) -> dict[str, Any]:
    answer = client.post("/v1/jobs", json={**BASE, **fields}, headers=auth(key))
    assert answer.status_code == 202, answer.text
    return answer.json()


def finish(db: Engine, job_id: str) -> None:
    """Pretend a worker ran the job: it succeeded with OUTPUTS."""
    with db.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET status = 'succeeded', outputs = CAST(:o AS jsonb), finished_at = now()"
                " WHERE id = :id"
            ),
            {"id": job_id, "o": json.dumps(OUTPUTS)},
        )


def test_an_identical_request_reuses_the_earlier_outputs(client: TestClient, key: str, db: Engine) -> None:
    first = submit(client, key)
    finish(db, first["id"])
    again = submit(client, key, priority=9, metadata={"run": 2})  # priority and metadata do not matter
    assert again["id"] != first["id"]
    assert again["status"] == "succeeded" and again["reused_from"] == first["id"]
    assert [o["key"] for o in again["outputs"]] == [OUTPUTS[0]["key"]] and again["outputs"][0]["url"]
    assert again["metadata"] == {"run": 2}
    read = client.get(f"/v1/jobs/{again['id']}", headers=auth(key)).json()
    assert read["reused_from"] == first["id"] and read["status"] == "succeeded"


@pytest.mark.parametrize(
    "change",
    [{"prompt": "a lighthouse at dawn"}, {"seed": 8}, {"width": 512}, {"steps": 4}, {"output_format": "jpeg"},
     {"num_images": 2}, {"reuse": False}],
)  # fmt: skip
def test_anything_that_changes_the_images_misses(
    client: TestClient, key: str, db: Engine, change: dict[str, Any]
) -> None:
    first = submit(client, key)
    finish(db, first["id"])
    other = submit(client, key, **change)
    assert other["status"] == "queued" and other["reused_from"] is None


def test_a_job_without_a_seed_is_never_reused(client: TestClient, key: str, db: Engine) -> None:
    first = submit(client, key, seed=None)
    finish(db, first["id"])
    assert submit(client, key, seed=None)["status"] == "queued"


def test_a_job_that_has_not_succeeded_is_not_reused(client: TestClient, key: str) -> None:
    submit(client, key)
    assert submit(client, key)["status"] == "queued"


def test_another_tenants_result_is_never_reused(client: TestClient, key: str, new_key: Any, db: Engine) -> None:
    first = submit(client, key)
    finish(db, first["id"])
    assert submit(client, new_key())["status"] == "queued"


def test_a_batch_reuses_what_it_can_and_queues_the_rest(client: TestClient, key: str, db: Engine) -> None:
    first = submit(client, key)
    finish(db, first["id"])
    body = {"defaults": {"reuse": True, "width": 256, "height": 256},
            "jobs": [{"prompt": BASE["prompt"], "seed": 7}, {"prompt": "a lighthouse, new", "seed": 7},
                     {"prompt": BASE["prompt"]}]}  # fmt: skip
    batch = client.post("/v1/batches", json=body, headers=auth(key)).json()
    assert (batch["counts"]["succeeded"], batch["counts"]["queued"]) == (1, 2)
    page = client.get(f"/v1/batches/{batch['id']}/jobs", headers=auth(key)).json()["data"]
    reused = [j for j in page if j["status"] == "succeeded"]
    assert len(reused) == 1 and reused[0]["reused_from"] == first["id"] and reused[0]["request"]["seed"] == 7
