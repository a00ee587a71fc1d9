"""The outbox: every terminal move writes the webhook deliveries it owes in its own statement, so they commit (or
roll back) together; a batch's delivery is written exactly once, by the move that ends its last job, even when two
transactions end its last two jobs at once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from core import lifecycle
from core.models import batches, jobs
from core.settings import Settings
from core.status import ErrorCode, JobStatus
from core.sweeper import sweep_once
from core.transition import transition
from tests.helpers.api import auth
from tests.helpers.webhooks import Receiver, claim, deliveries, delivering, settled, succeed, wait_for

Tenant = Callable[[], tuple[str, str, str]]
HOOK = "http://127.0.0.1:9/hook"  # allow-listed; nothing is sent in these tests but the last two


def submit(client: TestClient, key: str, **fields: Any) -> dict[str, Any]:
    fields = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, **fields}
    r = client.post("/v1/jobs", json=fields, headers=auth(key))
    assert r.status_code == 202, r.text
    return r.json()


def submit_batch(client: TestClient, key: str, n: int, **top: Any) -> dict[str, Any]:
    body = {"jobs": [{"prompt": f"item {i}", "width": 256, "height": 256, "seed": i} for i in range(n)], **top}
    r = client.post("/v1/batches", json=body, headers=auth(key))
    assert r.status_code == 202, r.text
    return r.json()


def batch_job_ids(db: Engine, batch_id: str) -> list[str]:
    with db.connect() as conn:
        return list(
            conn.execute(select(jobs.c.id).where(jobs.c.batch_id == batch_id).order_by(jobs.c.batch_index)).scalars()
        )


def test_the_delivery_commits_with_the_terminal_status_and_only_with_it(
    client: TestClient, db: Engine, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    job = submit(client, key, webhook_url=HOOK)
    held = claim(db, job["id"])
    with db.connect() as conn:  # the move made, then lost (a crash before the commit): no delivery either
        moved = conn.execute(transition(JobStatus.SUCCEEDED, fence=[held], values={"outputs": []}).returning(jobs.c.id))
        assert moved.scalar() == job["id"]
        assert len(conn.execute(select(jobs.c.id).select_from(jobs).where(jobs.c.id == job["id"])).all()) == 1
        conn.rollback()
    assert deliveries(db, job_id=job["id"]) == []
    # The worker's own write: once it returns, the delivery is committed, before any delivery process ran.
    with db.connect() as conn:
        assert lifecycle.record_success(conn, held, outputs=[], inference_ms=1, upload_ms=1)
    (row,) = deliveries(db, job_id=job["id"])
    assert (row["status"], row["url"], row["attempts"]) == ("pending", HOOK, 0)
    assert row["payload"] == {"object": "job", "id": job["id"], "status": "succeeded"}


def _fail(db: Engine, client: TestClient, key: str, job_id: str, **_: Any) -> None:
    held = claim(db, job_id)
    with db.connect() as conn:
        assert lifecycle.record_failure(conn, held, code=ErrorCode.INVALID_INPUT, message="bad")


def _cancel_queued(db: Engine, client: TestClient, key: str, job_id: str, **_: Any) -> None:
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200


def _cancel_running(db: Engine, client: TestClient, key: str, job_id: str, **_: Any) -> None:
    claim(db, job_id)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200


def _give_up(db: Engine, client: TestClient, key: str, job_id: str, *, settings: Settings, redis_client: Any) -> None:
    claim(db, job_id)
    with db.begin() as conn:  # its lease ran out, and it has no attempt left
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(lease_expires_at=jobs.c.created_at, max_attempts=jobs.c.attempt)
        )
    sweep_once(db, redis_client, settings)


PATHS = {
    "record_failure": (_fail, "failed"),
    "cancel_queued": (_cancel_queued, "canceled"),
    "cancel_running": (_cancel_running, "canceled"),
    "sweeper_give_up": (_give_up, "failed"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_terminal_path_writes_the_jobs_delivery(
    client: TestClient, db: Engine, tenant: Tenant, settings: Settings, redis_client: redis.Redis, path: str
) -> None:
    end, status = PATHS[path]
    _, key, _ = tenant()
    job = submit(client, key, webhook_url=HOOK)
    plain = submit(client, key)
    end(db, client, key, job["id"], settings=settings, redis_client=redis_client)
    end(db, client, key, plain["id"], settings=settings, redis_client=redis_client)
    (row,) = deliveries(db, job_id=job["id"])
    assert row["payload"] == {"object": "job", "id": job["id"], "status": status}
    assert deliveries(db, job_id=plain["id"]) == []  # no webhook_url, no delivery


def test_a_reused_result_writes_its_delivery(client: TestClient, db: Engine, tenant: Tenant) -> None:
    _, key, _ = tenant()
    first = submit(client, key, seed=7, reuse=True)
    succeed(db, first["id"])
    again = submit(client, key, seed=7, reuse=True, webhook_url=HOOK)
    assert again["status"] == "succeeded" and again["reused_from"] == first["id"]
    (row,) = deliveries(db, job_id=again["id"])
    assert row["payload"]["status"] == "succeeded"


def test_a_batch_cancel_writes_each_jobs_delivery_and_the_batchs(
    client: TestClient, db: Engine, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    batch = submit_batch(client, key, 3, webhook_url=HOOK, defaults={"webhook_url": HOOK})
    ids = batch_job_ids(db, batch["id"])
    succeed(db, ids[0])  # one job ends before the cancel: its delivery is its own
    assert deliveries(db, batch_id=batch["id"]) == []
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(key)).status_code == 200
    assert [len(deliveries(db, job_id=i)) for i in ids] == [1, 1, 1]
    (row,) = deliveries(db, batch_id=batch["id"])
    assert row["payload"] == {"object": "batch", "id": batch["id"]} and row["url"] == HOOK


def test_a_batch_whose_jobs_were_all_reused_is_complete_at_once(client: TestClient, db: Engine, tenant: Tenant) -> None:
    _, key, _ = tenant()
    done = submit(client, key, seed=0, reuse=True, prompt="item 0")
    succeed(db, done["id"])
    batch = submit_batch(client, key, 1, webhook_url=HOOK, defaults={"reuse": True})
    assert batch["status"] == "completed"
    assert len(deliveries(db, batch_id=batch["id"])) == 1


def test_two_transactions_ending_a_batchs_last_jobs_at_once_write_one_batch_delivery(
    client: TestClient, db: Engine, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    batch = submit_batch(client, key, 2, webhook_url=HOOK)
    first, second = (claim(db, i) for i in batch_job_ids(db, batch["id"]))
    errors: list[BaseException] = []

    def end_second() -> None:
        try:
            with db.connect() as conn:
                conn.execute(
                    transition(JobStatus.SUCCEEDED, fence=[second], values={"outputs": []}).returning(jobs.c.id)
                )
                conn.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    with db.connect() as conn:
        # The first move is made and not committed: in its snapshot the other job still runs, and vice versa.
        conn.execute(transition(JobStatus.SUCCEEDED, fence=[first], values={"outputs": []}).returning(jobs.c.id))
        other = threading.Thread(target=end_second)
        other.start()
        time.sleep(0.5)
        assert other.is_alive()  # waiting for the batch's row, which the first move holds
        conn.commit()
    other.join(10)
    assert not errors and not other.is_alive()
    assert len(deliveries(db, batch_id=batch["id"])) == 1
    with db.connect() as conn:
        assert conn.execute(select(batches.c.open_jobs).where(batches.c.id == batch["id"])).scalar() == 0


def test_a_batch_that_completes_is_announced_once_with_the_batch_object(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    _, key, secret = tenant()
    with Receiver() as rx:
        rx.secrets = [secret]
        batch = submit_batch(client, key, 3, webhook_url=rx.url, metadata={"campaign": "spring"})
        ids = batch_job_ids(db, batch["id"])
        for job_id in ids[:-1]:
            succeed(db, job_id)
        assert deliveries(db, batch_id=batch["id"]) == []  # a job still runs: not yet
        _fail(db, client, key, ids[-1])
        (row,) = deliveries(db, batch_id=batch["id"])
        with delivering(hook_settings):
            wait_for(lambda: settled(db, row["id"]))
    (got,) = rx.requests
    assert got.verified_with == [secret]
    body = json.loads(got.body)
    assert (body["object"], body["id"], body["status"]) == ("batch", batch["id"], "completed")
    assert body["counts"] == {"total": 3, "queued": 0, "running": 0, "succeeded": 2, "failed": 1, "canceled": 0}
    assert body["metadata"] == {"campaign": "spring"} and body["finished_at"] is not None
    listing = client.get(f"/v1/batches/{batch['id']}/webhooks", headers=auth(key)).json()["data"]
    assert [(d["status"], [a["status_code"] for a in d["attempts"]]) for d in listing] == [("succeeded", [200])]
