"""Webhooks end to end: the API, a real worker and the delivery process as processes (``deploy.stack``). A receiver
that never answers costs the worker nothing (its jobs finish as fast as without it: the worker never calls a
webhook); a batch that completes is announced once, with its batch object."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from core.settings import Settings
from deploy.stack import Stack
from tests.fixtures.services import cancel_backlog
from tests.helpers.webhooks import HANG, Receiver, attempts, deliveries, settled, wait_for

pytestmark = pytest.mark.e2e

Tenant = Callable[[], tuple[str, str, str]]
TIMEOUT_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stack(hook_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """SeaweedFS (the session's), the API, one worker and the webhook delivery process."""
    port = _free_port()
    run = Stack(
        hook_settings.model_copy(update={"api_base_url": f"http://127.0.0.1:{port}", "webhook_timeout_s": TIMEOUT_S}),
        tmp_path_factory.mktemp("hooks-stack"),
        api_port=port,
        s3_port=None,
    )
    cancel_backlog(hook_settings)  # this module's jobs run first, not earlier modules' leftovers
    run.start()
    yield run
    run.stop()


def post(stack: Stack, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{stack.api_url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()


def get(stack: Stack, key: str, path: str) -> dict[str, Any]:
    r = httpx.get(f"{stack.api_url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def finished(stack: Stack, key: str, ids: list[str]) -> list[dict[str, Any]] | None:
    jobs = [get(stack, key, f"/v1/jobs/{i}") for i in ids]
    return jobs if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs) else None


def test_a_receiver_that_never_answers_does_not_slow_the_worker(stack: Stack, db: Engine, tenant: Tenant) -> None:
    _, key, _ = tenant()
    request = {"prompt": "a red fox", "width": 256, "height": 256, "steps": 2}
    # Without webhooks first: how long the worker takes for these jobs here.
    plain = [post(stack, key, "/v1/jobs", {**request, "seed": i})["id"] for i in range(4)]
    began = time.monotonic()
    wait_for(lambda: finished(stack, key, plain), timeout_s=120, every_s=0.2)
    alone_s = time.monotonic() - began
    with Receiver(default=HANG, hang_s=30) as rx:
        hooked = [
            post(stack, key, "/v1/jobs", {**request, "seed": 10 + i, "webhook_url": rx.url})["id"] for i in range(4)
        ]
        began = time.monotonic()
        done = wait_for(lambda: finished(stack, key, hooked), timeout_s=120, every_s=0.2)
        hooked_s = time.monotonic() - began
        assert all(j["status"] == "succeeded" for j in done)
        # Each delivery is tried, times out, and waits for its retry; meanwhile the jobs finished at the same pace
        # (a worker that called its webhooks would have spent 4 x 2 s in them).
        rows = [deliveries(db, job_id=i)[0] for i in hooked]
        first = wait_for(lambda: attempts(db, rows[0]["id"]), timeout_s=30)
        assert first[0]["status_code"] is None and first[0]["error"].startswith("timeout")
        assert TIMEOUT_S * 1000 * 0.9 <= first[0]["latency_ms"] < TIMEOUT_S * 1000 * 2
        assert all(settled(db, r["id"]) is None for r in rows)  # still owed: they are retried later
    assert hooked_s < alone_s + 4 * TIMEOUT_S * 0.5, (alone_s, hooked_s)
    assert "webhook" not in stack.log_tail("worker", 2000).lower()
    assert "webhook delivery ready" in stack.log_tail("webhooks", 2000)


def test_a_batch_is_announced_once_when_its_last_job_ends(stack: Stack, db: Engine, tenant: Tenant) -> None:
    _, key, secret = tenant()
    with Receiver() as rx:
        rx.secrets = [secret]
        body = {
            "defaults": {"width": 256, "height": 256, "steps": 2, "webhook_url": rx.url},
            "jobs": [{"prompt": f"tile {i}", "seed": i} for i in range(3)],
            "webhook_url": rx.url,
            "metadata": {"run": "hooks"},
        }
        batch = post(stack, key, "/v1/batches", body)
        wait_for(lambda: len(rx.requests) >= 4, timeout_s=120, every_s=0.2)
        time.sleep(1.0)  # nothing more arrives
    bodies = [json.loads(r.body) for r in rx.requests]
    assert all(r.verified_with == [secret] for r in rx.requests)
    assert sorted(b["object"] for b in bodies) == ["batch", "job", "job", "job"]
    (announced,) = [b for b in bodies if b["object"] == "batch"]
    assert announced["id"] == batch["id"] and announced["status"] == "completed"
    assert announced["counts"]["succeeded"] == 3 and announced["metadata"] == {"run": "hooks"}
    (row,) = get(stack, key, f"/v1/batches/{batch['id']}/webhooks")["data"]
    assert row["status"] == "succeeded" and [a["status_code"] for a in row["attempts"]] == [200]
