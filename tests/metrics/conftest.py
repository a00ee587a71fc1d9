"""Metrics and logs fixtures: the API and one worker as real processes (as ``make up`` starts them), and one job
run through them so their scrapes and log files hold what a job leaves."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from core.admin import create_key
from core.settings import Settings
from deploy.stack import Stack, free_port
from tests.fixtures.services import cancel_backlog


@dataclass(frozen=True)
class Traffic:
    """What the module's stack was asked to do: a job that ran, one that was canceled, the ids used."""

    key: str
    tenant: str
    done_job: dict
    canceled_job: dict
    request_id: str  # the X-Request-ID sent with the cancel
    echoed_id: str  # what the cancel's response echoed
    prompt: str  # in both jobs; must appear in no log line


@pytest.fixture(scope="package")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API and one worker as processes (the session's SeaweedFS), each worker on a free metrics port."""
    port = free_port()
    run = Stack(
        settings.model_copy(update={"api_base_url": f"http://127.0.0.1:{port}", "log_level": "INFO"}),
        tmp_path_factory.mktemp("metrics-stack"),
        api_port=port,
        s3_port=None,
        worker_queues="generate",
    )
    cancel_backlog(settings)  # this package's jobs run first, not earlier modules' leftovers
    try:
        run.start_api()
        run.start_worker()
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="package")
def traffic(stack: Stack, settings: Settings, db: Engine) -> Traffic:
    """One job run to success, and one canceled (queued or running), for a tenant of their own."""
    key = create_key(settings, f"metrics-{secrets.token_hex(4)}")
    prompt = f"a private prompt {secrets.token_hex(6)}"
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=stack.api_url, headers=auth, timeout=30) as client:
        job = client.post("/v1/jobs", json={"prompt": prompt, "width": 256, "height": 256, "seed": 3}).json()
        deadline = time.monotonic() + 300
        while (done := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, done
            time.sleep(0.3)
        assert done["status"] == "succeeded", done
        rid = f"test-{secrets.token_hex(4)}"
        for seed in range(4, 10):  # the idle worker may finish a job before its cancel arrives: then another
            other = client.post("/v1/jobs", json={"prompt": prompt, "width": 256, "height": 256, "seed": seed})
            canceled = client.post(f"/v1/jobs/{other.json()['id']}/cancel", headers={"X-Request-ID": rid})
            if canceled.status_code == 200:
                break
        assert canceled.status_code == 200, canceled.text
    with db.connect() as conn:
        tenant = conn.execute(text("SELECT tenant_id FROM jobs WHERE id = :id"), {"id": job["id"]}).scalar_one()
    return Traffic(key, tenant, done, canceled.json(), rid, canceled.headers["x-request-id"], prompt)


def log_path(stack: Stack, name: str) -> Path:
    """The log file of one of the stack's processes."""
    return stack.run_dir / "logs" / f"{name}.log"
