"""How soon a webhook leaves: 100 jobs end at 100 a second, all announced to one fast receiver on loopback (one
endpoint: deliveries go one at a time). The delay from each job's terminal status to its first attempt is printed
(p50 / p99 / max); the goal is p99 ≤ 1 s."""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from core import lifecycle
from core.models import jobs, webhook_attempts, webhook_deliveries
from core.settings import Settings
from tests.helpers.api import auth
from tests.helpers.webhooks import Receiver, delivering, wait_for

Tenant = Callable[[], tuple[str, str, str]]
JOBS = 100
RATE = 100.0  # jobs ending per second


def test_first_attempts_leave_within_a_second_of_the_terminal_status(
    client: TestClient, db: Engine, hook_settings: Settings, tenant: Tenant
) -> None:
    _, key, _ = tenant()
    with Receiver() as rx:
        ids = []
        for i in range(JOBS):
            r = client.post(
                "/v1/jobs",
                json={"prompt": f"p{i}", "width": 256, "height": 256, "seed": i, "webhook_url": rx.url},
                headers=auth(key),
            )
            assert r.status_code == 202
            ids.append(r.json()["id"])
        queue = f"hooks-{secrets.token_hex(4)}"
        with db.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id.in_(ids)).values(queue=queue))
        with db.connect() as conn:
            held = lifecycle.claim_batch(
                conn, queue=queue, worker_id="bench", lease_s=300, max_images=JOBS, token_budget=10**9
            )
        assert len(held) == JOBS
        with delivering(hook_settings):
            time.sleep(1.0)  # listening
            start = time.monotonic()
            with db.connect() as conn:
                for n, job in enumerate(held):
                    assert lifecycle.record_success(conn, job, outputs=[], inference_ms=1, upload_ms=1)
                    pause = start + (n + 1) / RATE - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
            ended_in = time.monotonic() - start
            wait_for(lambda: len(rx.requests) >= JOBS, timeout_s=60)
    with db.connect() as conn:
        rows = conn.execute(
            select(webhook_attempts.c.started_at, jobs.c.finished_at)
            .join(webhook_deliveries, webhook_deliveries.c.id == webhook_attempts.c.delivery_id)
            .join(jobs, jobs.c.id == webhook_deliveries.c.job_id)
            .where(jobs.c.id.in_(ids), webhook_attempts.c.attempt == 1)
        ).all()
    delays = sorted((started - finished).total_seconds() for started, finished in rows)
    assert len(delays) == JOBS
    p50 = statistics.median(delays)
    p99 = delays[int(0.99 * JOBS) - 1]
    print(
        f"\nwebhook first-attempt delay, {JOBS} jobs ending at {JOBS / ended_in:.0f}/s to one endpoint: "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms"
    )
    assert p99 <= 1.0
