"""Fair share between tenants, against Postgres: a claim serves the queued tenant with the smallest virtual clock,
fills its batch with compatible jobs of the others, and advances every served tenant's clock by tokens / weight.
Each test uses a queue of its own, so other tests' rows never take part."""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text

from core import admin, lifecycle
from core.ids import tenant_id as new_tenant_id
from core.lifecycle import ClaimedJob
from core.models import jobs, tenants
from core.schemas import JobRequest
from core.settings import Settings
from core.submission import build_job_row

IMAGE_TOKENS = 256  # a 256x256 image: (256/16) ** 2
BATCH = 4  # images per claim in these tests
BUDGET = BATCH * IMAGE_TOKENS


def a_queue() -> str:
    """A queue name no other test uses."""
    return f"fair-{secrets.token_hex(4)}"


def a_tenant(db: Engine, *, weight: float = 1.0, vclock: float = 0.0) -> str:
    """A new tenant with the given weight and clock."""
    tid = new_tenant_id()
    with db.begin() as conn:
        conn.execute(insert(tenants).values(id=tid, name=f"fair-{tid}", weight=weight, vclock=vclock))
    return tid


def queue_jobs(db: Engine, tenant: str, n: int, *, queue: str, **request: Any) -> list[str]:
    """``n`` queued jobs of ``tenant`` in ``queue`` (256x256, one image, unless ``request`` says otherwise),
    inserted in one statement: each is a little older than the next."""
    req = JobRequest.model_validate({"prompt": "fair", "width": 256, "height": 256, "seed": 1, **request})
    rows = [{**build_job_row(req, tenant_id=tenant, max_attempts=3), "queue": queue} for _ in range(n)]
    with db.begin() as conn:
        conn.execute(insert(jobs), rows)
    return [r["id"] for r in rows]


def claim(db: Engine, queue: str, *, fresh_only: bool = False) -> list[ClaimedJob]:
    """One claim of at most BATCH images (and BUDGET tokens) from ``queue``."""
    with db.connect() as conn:
        return lifecycle.claim_batch(
            conn,
            queue=queue,
            worker_id="fair",
            lease_s=60,
            max_images=BATCH,
            token_budget=BUDGET,
            fresh_only=fresh_only,
        )


def clock(db: Engine, tenant: str) -> float:
    """A tenant's virtual clock now."""
    with db.connect() as conn:
        return float(conn.execute(select(tenants.c.vclock).where(tenants.c.id == tenant)).scalar_one())


def test_a_single_job_is_not_starved_by_another_tenants_backlog(db: Engine) -> None:
    queue = a_queue()
    a, b = a_tenant(db), a_tenant(db)
    queue_jobs(db, a, 200, queue=queue)
    (lone,) = queue_jobs(db, b, 1, queue=queue)
    first, second = claim(db, queue), claim(db, queue)
    assert lone in {j.id for j in first + second}
    # The claim that serves it fills the rest of the batch with A's compatible jobs.
    assert len(first) == len(second) == BATCH


def test_images_split_by_weight_when_both_tenants_stay_backlogged(db: Engine) -> None:
    queue = a_queue()
    heavy, light = a_tenant(db, weight=3), a_tenant(db, weight=1)
    queue_jobs(db, heavy, 150, queue=queue)
    queue_jobs(db, light, 60, queue=queue)
    images: Counter[str] = Counter()
    for _ in range(40):  # 160 images: both tenants still have jobs queued at the end
        for job in claim(db, queue):
            images[job.tenant_id] += job.request["num_images"]
    assert sum(images.values()) == 40 * BATCH
    assert images[heavy] / images[light] == pytest.approx(3, rel=0.15)


def test_priority_orders_the_jobs_of_a_tenant(db: Engine) -> None:
    queue = a_queue()
    tenant = a_tenant(db)
    low = queue_jobs(db, tenant, 2, queue=queue, priority=1)
    high = queue_jobs(db, tenant, 4, queue=queue, priority=9)
    normal = queue_jobs(db, tenant, 2, queue=queue)
    assert [j.id for j in claim(db, queue)] == high
    assert [j.id for j in claim(db, queue)] == normal + low


def test_an_idle_tenant_rejoins_at_the_floor_not_at_its_old_clock(db: Engine) -> None:
    queue = a_queue()
    busy, idle = a_tenant(db, vclock=10_000), a_tenant(db, vclock=0)
    queue_jobs(db, busy, 40, queue=queue)
    queue_jobs(db, idle, 40, queue=queue)
    first = claim(db, queue)
    assert {j.tenant_id for j in first} == {idle}
    # Floor: the other queued tenant's clock less one batch of credit (BUDGET over its weight of 1).
    floor = 10_000 - BUDGET
    assert clock(db, idle) == pytest.approx(floor + len(first) * IMAGE_TOKENS)
    served = Counter(j.tenant_id for _ in range(10) for j in claim(db, queue))
    # From there the two share the queue evenly instead of the idle tenant taking ~40 claims in a row.
    assert served[busy] == served[idle] == 20


def test_a_batch_fills_with_compatible_jobs_of_other_tenants(db: Engine) -> None:
    queue = a_queue()
    head, other = a_tenant(db), a_tenant(db, vclock=5)
    (single,) = queue_jobs(db, head, 1, queue=queue)
    queue_jobs(db, other, 1, queue=queue, width=512, height=512)  # another group: never in this batch
    compatible = queue_jobs(db, other, 5, queue=queue)
    batch = claim(db, queue)
    assert sorted(j.id for j in batch) == sorted([single, *compatible[:3]])
    # Each tenant pays for what it was served.
    assert clock(db, head) == pytest.approx(IMAGE_TOKENS)
    assert clock(db, other) == pytest.approx(5 + 3 * IMAGE_TOKENS)


def test_a_tenant_whose_jobs_another_claim_holds_is_passed_over(db: Engine) -> None:
    queue = a_queue()
    first, second = a_tenant(db), a_tenant(db, vclock=100)
    (held,) = queue_jobs(db, first, 1, queue=queue)
    waiting = queue_jobs(db, second, 2, queue=queue)
    with db.connect() as other:  # another claimer holds the first tenant's only job, not yet committed
        other.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": held})
        assert sorted(j.id for j in claim(db, queue)) == sorted(waiting)
        other.rollback()
    assert [j.id for j in claim(db, queue)] == [held]


def test_a_job_that_lost_a_worker_runs_alone_and_not_in_a_claim_ahead(db: Engine) -> None:
    def retried_and_fresh() -> tuple[str, str, list[str]]:
        queue, tenant = a_queue(), a_tenant(db)
        (retried,) = queue_jobs(db, tenant, 1, queue=queue)
        with db.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == retried).values(attempt=1))
        return queue, retried, queue_jobs(db, tenant, 3, queue=queue)

    queue, retried, _ = retried_and_fresh()
    assert [(j.id, j.attempt) for j in claim(db, queue)] == [(retried, 2)]
    queue, _, fresh = retried_and_fresh()
    assert sorted(j.id for j in claim(db, queue, fresh_only=True)) == sorted(fresh)


def test_zimage_admin_sets_a_weight_above_zero_only(
    db: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZIMAGE_DATABASE_URL", settings.database_url)
    tenant = a_tenant(db)
    with db.connect() as conn:
        name = conn.execute(select(tenants.c.name).where(tenants.c.id == tenant)).scalar_one()

    def weight() -> float:
        with db.connect() as conn:
            return float(conn.execute(select(tenants.c.weight).where(tenants.c.id == tenant)).scalar_one())

    assert admin.main(["set-weight", "--tenant", name, "2.5"]) == 0
    assert weight() == 2.5
    for bad in ("0", "-1", "nan", "inf"):
        assert admin.main(["set-weight", "--tenant", name, bad]) == 2
        assert "above 0" in capsys.readouterr().err
    assert weight() == 2.5
    assert admin.main(["set-weight", "--tenant", f"{name}-missing", "2"]) == 1
    assert "no such tenant" in capsys.readouterr().err
