"""Fair share on the real stack: while one tenant's 2 000-job batch runs, another tenant's single job starts
within two batch times instead of waiting behind the whole backlog."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from client import ZImageClient
from core.models import jobs, tenants
from core.settings import Settings
from core.status import JobStatus
from core.transition import transition
from deploy.stack import Stack, free_port
from tests.fixtures.services import cancel_backlog

pytestmark = pytest.mark.e2e

FLOOD = 2000
SMALL = {"width": 256, "height": 256, "steps": 1}  # short batches: the test is about order, not images


@pytest.fixture(scope="module")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """SeaweedFS (the session's), the API and one worker, as real processes."""
    port = free_port()
    run = Stack(
        settings.model_copy(update={"api_base_url": f"http://127.0.0.1:{port}"}),
        tmp_path_factory.mktemp("stack"),
        api_port=port,
        s3_port=None,
    )
    cancel_backlog(settings)  # this module's jobs run first, not earlier modules' leftovers
    run.start()
    yield run
    run.stop()


def _tenant_id(db: Engine, name: str) -> str:
    with db.connect() as conn:
        return str(conn.execute(select(tenants.c.id).where(tenants.c.name == name)).scalar_one())


def _until(what: str, probe: Any, timeout_s: float) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (found := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.1)
    return found


def test_a_single_job_starts_within_two_batches_of_another_tenants_flood(
    stack: Stack,
    settings: Settings,
    db: Engine,
    new_key,  # type: ignore[no-untyped-def]
) -> None:
    flooder, single = f"flood-{time.time_ns()}", f"single-{time.time_ns()}"
    flood_key, single_key = new_key(flooder), new_key(single)
    flooder_id = _tenant_id(db, flooder)

    def flood_started() -> int:
        with db.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(jobs.c.tenant_id == flooder_id, jobs.c.started_at.is_not(None))
                ).scalar_one()
            )

    try:
        with ZImageClient(stack.api_url, flood_key) as client:
            prompts = [{"prompt": f"flood {i}", "seed": i} for i in range(FLOOD)]
            client.submit_batch(prompts, defaults=SMALL)
        # The backlog is being worked on (its tenant's clock has moved) when the other tenant's job arrives.
        _until("the flood starts running", flood_started, 60)
        with ZImageClient(stack.api_url, single_key) as client:
            job = client.submit({"prompt": "just one", "seed": 1, **SMALL})

        def started() -> Any:
            with db.connect() as conn:
                return conn.execute(
                    select(jobs.c.created_at, jobs.c.started_at).where(
                        jobs.c.id == job["id"], jobs.c.started_at.is_not(None)
                    )
                ).first()

        created_at, started_at = _until("the single job starts", started, 60)
        with db.connect() as conn:
            overtaking = conn.execute(
                select(func.count()).where(
                    jobs.c.tenant_id == flooder_id,
                    jobs.c.started_at > created_at,
                    jobs.c.started_at < started_at,
                )
            ).scalar_one()
        # At most the batch claimed before it arrived (claimed ahead while another ran) and one more.
        assert overtaking <= 2 * settings.max_batch_images, (overtaking, flood_started())
        assert flood_started() < FLOOD // 2  # it really jumped a backlog
        with ZImageClient(stack.api_url, single_key) as client:
            assert client.wait([job["id"]], timeout_s=60)[job["id"]]["status"] == "succeeded"
    finally:
        # Later tests in this database must find the queue empty: what is left of the flood is canceled.
        with db.begin() as conn:
            conn.execute(transition(JobStatus.CANCELED, where=[jobs.c.tenant_id == flooder_id]).returning(jobs.c.id))
