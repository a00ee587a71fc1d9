"""Cancel goes through the gate: from every status, POST /v1/jobs/{id}/cancel changes the job exactly when the
state machine allows the move to canceled, and answers 409 (changing nothing) when it does not."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from core.models import jobs
from core.status import JobStatus, can_move, is_terminal
from tests.helpers.api import auth


def row(db: Engine, job_id: str) -> dict[str, Any]:
    with db.connect() as conn:
        return dict(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())


@pytest.mark.parametrize("start", list(JobStatus))
def test_cancel_obeys_the_table_from_every_status(
    client: TestClient, key: str, db: Engine, start: JobStatus
) -> None:
    job = client.post("/v1/jobs", json={"prompt": "cancel gate", "width": 256, "height": 256}, headers=auth(key))
    assert job.status_code == 202
    job_id = job.json()["id"]
    with db.begin() as conn:  # put the job straight into the status under test
        conn.execute(
            update(jobs).where(jobs.c.id == job_id).values(status=start.value, lease_expires_at=None, attempt=1)
        )
    before = row(db, job_id)
    answer = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    after = row(db, job_id)
    if can_move(start, JobStatus.CANCELED):
        assert answer.status_code == 200 and answer.json()["status"] == "canceled"
        assert after["status"] == "canceled" and after["finished_at"] is not None
        assert after["progress_step"] is None and "total_ms" in after["timings"]
    else:
        assert is_terminal(start)
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "conflict"
        assert after == before
